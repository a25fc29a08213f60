"""The CAM method registry: name -> :class:`CamMethod` (function + what it needs + what it costs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from auditor.cams.context import CamContext
from auditor.registry import Registry, merge_options

MethodFn = Callable[[CamContext], Tensor]
LayerPicker = Callable[[nn.Module, Tensor, str], list[str]]
Requirement = Callable[[nn.Module, Tensor], str | None]

#: Options every method accepts (DESIGN: generic smoothing). ``aug_smooth`` averages the map over test-time
#: augmentations (horizontal flip x intensity 0.9 / 1 / 1.1, six passes, as pytorch-grad-cam); the engine
#: applies it. ``eigen_smooth`` exists only for channel-weighted methods (see :meth:`CamContext.weighted`).
GENERIC_OPTIONS: dict[str, Any] = {"aug_smooth": False}


@dataclass(frozen=True)
class CamMethod:
    """A registered CAM method.

    Attributes:
        name: registry key (snake_case paper name).
        fn: pure function ``CamContext -> [B, h, w]`` signed map (layer methods) or ``[B, H, W]`` map
            (pixel methods).
        family: ``gradient`` | ``activation`` | ``perturbation`` | ``pixel``.
        needs: what the shared pass must capture at the target layer: ``gradients``, ``activations`` or
            ``nothing`` (black-box methods only need the model and the logits).
        forwards: cost in forward passes per image and explained class (a formula; K = channels).
        backwards: cost in backward passes per image and explained class.
        reference: paper and arXiv id.
        options: option names and defaults; unknown options raise.
        output: ``layer`` (map at the layer's resolution) or ``pixel`` (at input resolution).
        class_sensitive: False for class-agnostic methods (Eigen-CAM) that cannot support class claims.
        multi_layer: whether a list of layers is accepted (fused).
        expensive: costs far more than one forward; ``auditor run`` applies it to the ``expensive`` subset.
        channel_weighted: the map is a weighted channel sum (through :meth:`CamContext.weighted`), so the
            generic ``eigen_smooth`` option applies.
        default_layers: for multi-layer methods, ``(model, images, target_layer) -> layer names`` used when
            the ``layers`` option is not given (None: the target layer alone).
        requires: ``(model, images) -> reason or None``: a cheap check of what the method needs from the model
            (attention modules, biases, activation modules); ``auditor run`` skips the method with the reason.
        hooks: whether the method needs module hooks (a layer capture, the pixel methods' ReLU rules, LeGrad's
            attention); the others are black-box and run on a TorchScript model.
    """

    name: str
    fn: MethodFn
    family: str
    needs: str
    forwards: str
    backwards: str
    reference: str
    options: Mapping[str, Any] = field(default_factory=dict)
    output: str = "layer"
    class_sensitive: bool = True
    multi_layer: bool = False
    expensive: bool = False
    channel_weighted: bool = False
    default_layers: LayerPicker | None = None
    requires: Requirement | None = None
    hooks: bool = True

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; an unknown option name raises with close matches."""
        return merge_options(f"method {self.name!r}", self.options, given)


CAMS: Registry[CamMethod] = Registry("CAM method")


def register_cam(
    name: str,
    *,
    family: str,
    needs: str,
    forwards: str,
    backwards: str,
    reference: str,
    options: Mapping[str, Any] | None = None,
    output: str = "layer",
    class_sensitive: bool = True,
    multi_layer: bool = False,
    expensive: bool | None = None,
    channel_weighted: bool = False,
    default_layers: LayerPicker | None = None,
    requires: Requirement | None = None,
    hooks: bool = True,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering a method function under ``name`` (see :class:`CamMethod`).

    ``expensive`` defaults to True for the perturbation family.
    """
    if needs not in ("gradients", "activations", "nothing"):
        raise ValueError(f"needs must be gradients|activations|nothing, got {needs!r}")

    def decorate(fn: MethodFn) -> MethodFn:
        CAMS.add(
            name,
            CamMethod(
                name=name,
                fn=fn,
                family=family,
                needs=needs,
                forwards=forwards,
                backwards=backwards,
                reference=reference,
                options=MappingProxyType(
                    {**GENERIC_OPTIONS, **({"eigen_smooth": False} if channel_weighted else {}), **dict(options or {})}
                ),
                output=output,
                class_sensitive=class_sensitive,
                multi_layer=multi_layer,
                expensive=family == "perturbation" if expensive is None else expensive,
                channel_weighted=channel_weighted,
                default_layers=default_layers,
                requires=requires,
                hooks=hooks,
            ),
        )
        return fn

    return decorate

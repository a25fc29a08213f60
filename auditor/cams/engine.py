"""Entry points of the CAM engine: :func:`compute_cams` (many methods, one shared pass) and
:func:`compute_cam` (one method)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from auditor.cams.context import CamContext, finalize, upsample
from auditor.cams.core import check_images, check_target_range, check_targets, model_device, model_state
from auditor.cams.layers import LayerData, layer_pass, resolve_layer
from auditor.cams.registry import CAMS, CamMethod
from auditor.cams.speed import auto_chunk

log = logging.getLogger(__name__)

LayerArg = str | Sequence[str] | None


@dataclass
class CamOutput:
    """One method's result for a batch.

    Attributes:
        method: registry name.
        maps: ``[B, H, W]`` float32 >= 0 at input resolution (None when ``upsample=False``).
        low_res: ``[B, h, w]`` float32 >= 0 at the layer's resolution (input resolution for pixel methods).
        valid: ``[B]`` bool; False where the map was non-finite or constant (e.g. all zero after the ReLU).
        layers: the layer names used (empty for black-box methods).
    """

    method: str
    maps: Tensor | None
    low_res: Tensor
    valid: Tensor
    layers: list[str]


@dataclass
class CamResult:
    """All methods' outputs for a batch plus the logits of the unperturbed images ``[B, num_classes]``."""

    logits: Tensor
    outputs: dict[str, CamOutput]

    def __getitem__(self, method: str) -> CamOutput:
        return self.outputs[method]


def _method_layers(
    spec: CamMethod, layer: LayerArg, options: Mapping[str, Any], default: str | None, model: nn.Module, images: Tensor
) -> list[str]:
    if spec.needs == "nothing":
        return []
    if spec.multi_layer and options.get("layers"):
        given = options["layers"]
        names = [given] if isinstance(given, str) else list(given)
    elif layer is None:
        names = []
    elif isinstance(layer, str):
        names = [layer]
    else:
        names = list(layer)
        if len(names) > 1 and not spec.multi_layer:
            raise ValueError(
                f"method {spec.name!r} uses one layer but got {names}; only layer_cam fuses several layers"
            )
    if not names:
        if default is None:
            raise ValueError(f"method {spec.name!r} needs a target layer")
        names = [default]
    if spec.default_layers is not None and len(names) == 1 and not options.get("layers"):
        names = spec.default_layers(model, images, names[0])
    if len(set(names)) != len(names):
        raise ValueError(f"layers listed twice for {spec.name!r}: {names}")
    return names


def compute_cams(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int],
    *,
    methods: Sequence[str],
    layer: LayerArg = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    upsample_maps: bool = True,
    mixed_precision: bool = False,
    sample_keys: Sequence[int] | Tensor | None = None,
) -> CamResult:
    """Compute several CAM methods for one batch, sharing one forward (+ one backward) between them.

    All gradient methods, ``cam`` and ``eigen_cam`` read the same captured activations and gradients;
    perturbation methods add their own chunked forwards. The model is left as found: no hooks, no
    parameter ``.grad``, every module's train/eval mode restored, also when an error is raised.

    Args:
        model: classifier returning logits ``[B, num_classes]``.
        images: ``[B, C, H, W]`` normalized images (moved to the model's device).
        targets: ``[B]`` explained class per image (exactly one per image).
        methods: registry names (see ``auditor methods``).
        layer: target layer name (``named_modules()``); None = auto (last conv block / last ViT block);
            a list only for multi-layer methods (``layer_cam``).
        options: per-method options, e.g. ``{"occlusion": {"window": 8}}``.
        batch_size: chunk size of the extra forwards of perturbation methods; None = from free memory
            (:func:`auditor.cams.core.auto_chunk`).
        upsample_maps: also return maps at input resolution.
        sample_keys: ``[B]`` integer keys of the images' random draws (SS-CAM, Smooth Grad-CAM++ noise); the
            run passes keys derived from sample ids, so a sample's noise does not depend on its batch.
            Default: the batch position.
        mixed_precision: run the extra forwards of perturbation methods under autocast (bfloat16 on CPU,
            float16 on CUDA); the shared gradient pass stays in full precision.

    Returns:
        :class:`CamResult`.
    """
    specs, resolved = _specs(methods, options)
    device = model_device(model)
    images = check_images(images, device)
    targets = check_targets(targets, images.shape[0], device)
    size = (int(images.shape[2]), int(images.shape[3]))

    keys = None if sample_keys is None else torch.as_tensor(sample_keys, dtype=torch.int64)
    order = [s.name for s in specs]
    smoothed = [s for s in specs if resolved[s.name].get("aug_smooth")]
    specs = [s for s in specs if not resolved[s.name].get("aug_smooth")]
    outputs: dict[str, CamOutput] = {}
    with model_state(model):
        if batch_size is None:
            batch_size = auto_chunk(model, images) if any(s.family == "perturbation" for s in specs) else 32
        per_method = _resolved_layers(model, images, specs, resolved, layer)
        logits, captured = _shared_pass(model, images, targets, specs, per_method)
        for spec in specs:
            names = sorted(per_method[spec.name], key=lambda n: captured[n].order)
            ctx = CamContext(
                model=model,
                images=images,
                targets=targets,
                logits=logits,
                layers=captured,
                layer=(names[-1] if spec.multi_layer else names[0]) if names else "",
                layer_names=names,
                options=resolved[spec.name],
                batch_size=batch_size,
                mixed_precision=mixed_precision,
                sample_keys=keys,
            )
            low, valid = finalize(spec.fn(ctx))
            maps = upsample(low, size) if upsample_maps else None
            outputs[spec.name] = CamOutput(spec.name, maps, low, valid, names)
    for spec in smoothed:
        plain = {k: v for k, v in resolved[spec.name].items() if k != "aug_smooth"}
        low, names = aug_smooth(
            lambda x, spec=spec, plain=plain: compute_cams(
                model,
                x,
                targets,
                methods=[spec.name],
                layer=layer,
                options={spec.name: plain},
                batch_size=batch_size,
                upsample_maps=False,
                mixed_precision=mixed_precision,
                sample_keys=keys,
            )[spec.name],
            images,
        )
        low, valid = finalize(low)
        maps = upsample(low, size) if upsample_maps else None
        outputs[spec.name] = CamOutput(spec.name, maps, low, valid, names)
    return CamResult(logits=logits, outputs={name: outputs[name] for name in order})


#: Test-time augmentations of ``aug_smooth`` (pytorch-grad-cam's ``tta.HorizontalFlip() x tta.Multiply``).
AUG_FLIPS: tuple[bool, ...] = (False, True)
AUG_FACTORS: tuple[float, ...] = (0.9, 1.0, 1.1)


def aug_smooth(run: Any, images: Tensor) -> tuple[Tensor, list[str]]:
    """Average of a method's maps over six test-time augmentations of the (normalized) input.

    Each augmentation multiplies the input by ``0.9``, ``1`` or ``1.1`` and optionally flips it left-right;
    each map is computed, ReLU'd by the engine, flipped back and averaged (pytorch-grad-cam's ``aug_smooth``
    min-max scales each map before averaging; here raw magnitudes are kept, as everywhere in auditor).

    Args:
        run: ``images [B, C, H, W] -> CamOutput`` for the plain method.
        images: ``[B, C, H, W]``.

    Returns:
        ``([B, h, w] averaged map, layer names)``.
    """
    total: Tensor | None = None
    names: list[str] = []
    for flip in AUG_FLIPS:
        for factor in AUG_FACTORS:
            x = images * factor
            out = run(x.flip(-1) if flip else x)
            low = out.low_res.flip(-1) if flip else out.low_res
            total = low if total is None else total + low
            names = out.layers
    assert total is not None
    return total / (len(AUG_FLIPS) * len(AUG_FACTORS)), names


def _specs(
    methods: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None
) -> tuple[list[CamMethod], dict[str, dict[str, Any]]]:
    """The registered methods and their options (defaults overlaid), after checking the arguments."""
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise ValueError("methods is empty; pass at least one method name")
    options = dict(options or {})
    unknown = [m for m in options if m not in methods]
    if unknown:
        raise ValueError(f"options given for method(s) {unknown} that are not in methods={list(methods)}")
    specs = [CAMS[m] for m in methods]
    return specs, {s.name: s.resolve_options(options.get(s.name)) for s in specs}


def layers_per_method(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    layer: LayerArg = None,
) -> dict[str, list[str]]:
    """The layer names each method would read on ``model`` (checked to exist); raises ``ValueError`` otherwise."""
    specs, resolved = _specs(methods, options)
    return _resolved_layers(model, images, specs, resolved, layer)


def _resolved_layers(
    model: nn.Module, images: Tensor, specs: list[CamMethod], resolved: dict[str, dict[str, Any]], layer: LayerArg
) -> dict[str, list[str]]:
    """The layer names each method reads (none for black-box methods), each resolved against the model."""
    default = None
    if any(s.needs != "nothing" for s in specs) and (
        layer is None or any(s.needs != "nothing" and not s.multi_layer for s in specs)
    ):
        single = layer if isinstance(layer, str) or layer is None else (layer[0] if len(layer) == 1 else None)
        if single is not None or layer is None:
            default = resolve_layer(model, single, images)
    per_method = {s.name: _method_layers(s, layer, resolved[s.name], default, model, images) for s in specs}
    for names in per_method.values():
        for name in names:
            resolve_layer(model, name, images)
    return per_method


def _shared_pass(
    model: nn.Module, images: Tensor, targets: Tensor, specs: list[CamMethod], per_method: dict[str, list[str]]
) -> tuple[Tensor, dict[str, LayerData]]:
    """One forward (+ one backward to the layers when a method needs gradients): float logits and captures."""
    all_layers = list(dict.fromkeys(n for names in per_method.values() for n in names))
    if all_layers:
        logits, captured = layer_pass(
            model, images, targets, all_layers, grad=any(s.needs == "gradients" for s in specs)
        )
        return logits.float(), captured
    with torch.no_grad():
        logits = model(images)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError("the model must return logits of shape [B, num_classes]")
    check_target_range(targets, logits.shape[1])
    return logits.detach().float(), {}


@overload
def compute_cam(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int],
    *,
    method: str = ...,
    layer: LayerArg = ...,
    batch_size: int | None = ...,
    return_low_res: Literal[False] = ...,
    **options: Any,
) -> Tensor: ...


@overload
def compute_cam(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int],
    *,
    method: str = ...,
    layer: LayerArg = ...,
    batch_size: int | None = ...,
    return_low_res: Literal[True],
    **options: Any,
) -> tuple[Tensor, Tensor]: ...


def compute_cam(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int],
    *,
    method: str = "grad_cam",
    layer: LayerArg = None,
    batch_size: int | None = None,
    return_low_res: bool = False,
    **options: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Compute one CAM method: raw (un-normalized), >= 0, float32 maps ``[B, H, W]`` at input resolution.

    Args:
        model: classifier returning logits ``[B, num_classes]``.
        images: ``[B, C, H, W]`` normalized images.
        targets: ``[B]`` explained class per image.
        method: registry name (``auditor methods`` lists them).
        layer: target layer name, None for auto, or a list for ``layer_cam``.
        batch_size: chunk size of extra forwards (perturbation methods); None = from free memory.
        return_low_res: also return the ``[B, h, w]`` map at the layer's resolution.
        **options: method options (e.g. ``window=8`` for occlusion).

    Returns:
        ``[B, H, W]`` maps, or ``(maps, low_res)`` with ``return_low_res=True``. Images whose map is
        constant or non-finite get an all-zero (NaN-free) map and a logged warning; use
        :func:`compute_cams` for the per-sample ``valid`` flags.
    """
    result = compute_cams(
        model, images, targets, methods=[method], layer=layer, options={method: options}, batch_size=batch_size
    )
    out = result.outputs[method]
    bad = (~out.valid).nonzero().flatten().tolist()
    if bad:
        log.warning(
            "%s: %d of %d maps are constant or non-finite (images %s)", method, len(bad), len(out.valid), bad[:10]
        )
    assert out.maps is not None  # upsample_maps=True
    return (out.maps, out.low_res) if return_low_res else out.maps

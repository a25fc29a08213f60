"""The metric registry: name -> :class:`Metric` (a pure function + direction + what it needs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from auditor.ops import from_pixels, minmax, to_pixels
from auditor.registry import Registry, merge_options


@dataclass
class MetricInputs:
    """What a metric may use for one batch. All tensors live on the same device.

    Attributes:
        maps: ``[B, H, W]`` float maps >= 0 at the model's input resolution (raw, un-normalized).
        masks: ``[B, H, W]`` bool object masks (the union of boxes where only boxes exist), or None.
        boxes: per image, ``[n_i, 4]`` float ``x0, y0, x1, y1`` boxes in input pixels (exclusive end), or None.
        scale: ``[B]`` input pixels per original-image pixel (for tolerances given in original pixels).
        model: the classifier (eval mode) for faithfulness metrics, or None.
        images: ``[B, C, H, W]`` normalized images, or None.
        targets: ``[B]`` explained classes, or None.
        mean, std: ``[C]`` input normalization (pixel = x * std + mean), or None for identity.
        batch_size: chunk size for the forwards of faithfulness metrics.
        seed: seed of tie-breaking noise and stochastic imputation.
        mixed_precision: run those forwards under autocast (bfloat16 on CPU, float16 on CUDA).
        cache: shared between the metrics of one batch (e.g. the probability of the unperturbed images).
        sample_keys: ``[B]`` integer keys of per-sample random draws (ROAD's imputation noise), derived
            from sample ids by the run so that a sample's draws do not depend on its batch; default:
            the batch position.
    """

    maps: Tensor
    masks: Tensor | None = None
    boxes: list[Tensor] | None = None
    scale: Tensor | None = None
    model: nn.Module | None = None
    images: Tensor | None = None
    targets: Tensor | None = None
    mean: Tensor | None = None
    std: Tensor | None = None
    batch_size: int = 64
    seed: int = 0
    mixed_precision: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    sample_keys: Tensor | None = None

    def require_masks(self, metric: str) -> Tensor:
        if self.masks is None:
            raise ValueError(f"metric {metric!r} needs object masks or boxes")
        return self.masks

    def require_model(self, metric: str) -> tuple[nn.Module, Tensor, Tensor]:
        if self.model is None or self.images is None or self.targets is None:
            raise ValueError(f"metric {metric!r} needs the model, the images and the targets")
        return self.model, self.images, self.targets

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized ``[B, C, H, W]`` -> pixel space."""
        return to_pixels(x, self.mean, self.std)

    def from_pixels(self, x: Tensor) -> Tensor:
        """Pixel space ``[B, C, H, W]`` -> normalized."""
        return from_pixels(x, self.mean, self.std)

    def probs(self, x: Tensor, targets: Tensor) -> Tensor:
        """Softmax probability ``[n]`` of ``targets`` for inputs ``x``, in chunks of ``batch_size``."""
        model, _, _ = self.require_model("probs")
        out = []
        from auditor.cams.speed import autocast, balanced_chunks

        with torch.no_grad(), autocast(x.device, self.mixed_precision):
            for sl in balanced_chunks(x.shape[0], self.batch_size):
                out.append(model(x[sl]).float().softmax(1).gather(1, targets[sl, None])[:, 0])
        return torch.cat(out) if out else torch.empty(0, device=x.device)

    def base_probs(self) -> Tensor:
        """``[B]`` probability of the explained class on the unperturbed images (cached)."""
        if "base_probs" not in self.cache:
            _, images, targets = self.require_model("base_probs")
            self.cache["base_probs"] = self.probs(images, targets)
        value: Tensor = self.cache["base_probs"]
        return value


@dataclass
class MetricResult:
    """One value per sample (NaN where undefined) plus named per-sample extras.

    ``extras`` holds ``[B]`` scalars that become result columns (e.g. ``energy_in_mask_chance``) and
    ``[B, n]`` curves kept for the report (e.g. ``deletion_curve``).
    """

    value: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


MetricFn = Callable[..., MetricResult]


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: registry key.
        fn: ``fn(inputs: MetricInputs, **options) -> MetricResult``.
        family: ``localization`` | ``faithfulness``.
        direction: ``higher`` or ``lower`` is better.
        needs: ``mask`` (object masks/boxes) or ``model`` (extra forwards).
        cost: forwards per sample (a formula), for ``auditor methods``.
        reference: paper / protocol followed.
        options: option names and defaults.
        expensive: run only on the ``expensive`` subset by default.
        chance: whether a ``<name>_chance`` column is produced.
        columns: the other per-sample columns its result carries (``extras`` of shape ``[B]``).
        curves: the per-sample curves its result carries (``extras`` of shape ``[B, n]``; kept in ``curves/``).
        host: computed on the CPU whatever the device (numpy/numba work): with ``overlap``, the run computes
            it while the device runs the next batch.
        charted: the report draws it per class (mean, CI, chance) on each class card.
    """

    name: str
    fn: MetricFn
    family: str
    direction: str
    needs: str
    cost: str
    reference: str
    options: Mapping[str, Any] = field(default_factory=dict)
    expensive: bool = False
    chance: bool = False
    columns: tuple[str, ...] = ()
    curves: tuple[str, ...] = ()
    host: bool = False
    charted: bool = False

    def outputs(self) -> list[str]:
        """Every column and curve name a result of this metric may hold."""
        return [self.name, *([f"{self.name}_chance"] if self.chance else []), *self.columns, *self.curves]

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; an unknown option name raises with close matches."""
        return merge_options(f"metric {self.name!r}", self.options, given)

    def __call__(self, inputs: MetricInputs, **options: Any) -> MetricResult:
        return self.fn(inputs, **self.resolve_options(options))


METRICS: Registry[Metric] = Registry("metric")


def register_metric(
    name: str,
    *,
    family: str,
    direction: str,
    needs: str,
    cost: str,
    reference: str,
    options: Mapping[str, Any] | None = None,
    expensive: bool = False,
    chance: bool = False,
    columns: tuple[str, ...] = (),
    curves: tuple[str, ...] = (),
    host: bool = False,
    charted: bool = False,
) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering a metric function (see :class:`Metric`)."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    if needs not in ("mask", "model"):
        raise ValueError(f"needs must be 'mask' or 'model', got {needs!r}")

    def decorate(fn: MetricFn) -> MetricFn:
        METRICS.add(
            name,
            Metric(
                name,
                fn,
                family,
                direction,
                needs,
                cost,
                reference,
                MappingProxyType(dict(options or {})),
                expensive,
                chance,
                tuple(columns),
                tuple(curves),
                host,
                charted,
            ),
        )
        return fn

    return decorate


def metric_columns(names: list[str]) -> dict[str, dict[str, str | bool | None]]:
    """The ``samples.parquet`` columns of the metrics ``names``: ``{column: {metric, direction[, charted]}}``.

    A metric's own column carries its direction (and ``charted: true`` when the report draws it); its chance
    level and extra columns carry none (they are context, not scores). Curves are not columns.
    """
    out: dict[str, dict[str, str | bool | None]] = {}
    for name in names:
        metric = METRICS[name]
        out[name] = {"metric": name, "direction": metric.direction} | ({"charted": True} if metric.charted else {})
        for col in [*([f"{name}_chance"] if metric.chance else []), *metric.columns]:
            out[col] = {"metric": name, "direction": None}
    return out


def tie_broken(maps: Tensor, seed: int) -> Tensor:
    """Min-max normalized maps plus seeded ``1e-4 * N(0, 1)`` noise, for ranking (``[B, H, W]``).

    Ranking a map with plateaus (ReLU zeros, upsampled 7x7 cells) by memory order would favour the top-left
    corner, exactly where watermarks sit; ROAD breaks ties the same way. One noise pattern per image size
    (from ``seed``), so a sample's ranking does not depend on the rest of its batch.
    """
    b, h, w = maps.shape
    norm = minmax(maps.flatten(1).float(), (1,))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(h * w, generator=gen).to(maps.device)
    return (norm + 1e-4 * noise).view(b, h, w)


def pixel_ranks(maps: Tensor, seed: int) -> Tensor:
    """``[B, H*W]`` rank of every pixel (0 = most salient), ties broken by :func:`tie_broken`."""
    order = tie_broken(maps, seed).flatten(1).argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank

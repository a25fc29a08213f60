"""Sanity checks (Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018, arXiv:1810.03292).

* Model-parameter randomization test (MPRT), cascading: re-initialize the head, then the last blocks, one
  after another from the logits down; after each step recompute the maps and compare them with the
  original ones (Spearman rank correlation of ``|m| / max|m|`` and SSIM of min-max maps). A method whose
  maps barely change is insensitive to the model and is marked unreliable.
* Method agreement: Spearman rank correlation between two methods' maps of the same sample.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from auditor.cams import compute_cams
from auditor.cams.core import model_state
from auditor.ops import minmax
from auditor.stats import spearman_rows


def _abs_norm(m: np.ndarray) -> np.ndarray:
    peak = np.abs(m).reshape(len(m), -1).max(1).reshape(-1, 1, 1)
    return np.abs(m) / np.where(peak > 0, peak, 1)


def map_similarity(original: Tensor, other: Tensor) -> dict[str, np.ndarray]:
    """Per-sample similarity of two ``[B, H, W]`` map sets: ``spearman`` (on ``|m|/max|m|``) and ``ssim``.

    SSIM uses ``gaussian_weights=True`` and ``data_range=1`` on min-max normalized maps (Adebayo et al.'s
    code); NaN where a map is constant.
    """
    a = original.detach().double().cpu().numpy()
    b = other.detach().double().cpu().numpy()
    rho = spearman_rows(_abs_norm(a).reshape(len(a), -1), _abs_norm(b).reshape(len(b), -1))
    ma, mb = minmax(a, (1, 2)), minmax(b, (1, 2))
    ssim = np.array(
        [
            structural_similarity(x, y, gaussian_weights=True, data_range=1.0)
            if x.max() > x.min() and y.max() > y.min()
            else np.nan
            for x, y in zip(ma, mb, strict=True)
        ]
    )
    return {"spearman": rho, "ssim": ssim}


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_container(module: nn.Module) -> bool:
    """Sequential / ModuleList, or a module whose list child holds most of its parameters (a ViT encoder)."""
    lists = (nn.Sequential, nn.ModuleList)
    if isinstance(module, lists):
        return True
    total = _n_params(module)
    return any(isinstance(c, lists) and 2 * _n_params(c) > total for c in module.children())


def cascade_blocks(model: nn.Module, n_blocks: int) -> list[str]:
    """Module names randomized cumulatively from the logits down: the head, then ``n_blocks`` blocks.

    Walks the model's children in reverse definition order, descending into containers; a step is a block
    (a module with sub-modules, e.g. a ResNet BasicBlock) or a weight layer (Conv/Linear). Normalization
    layers alone are not steps. For a ResNet: ``fc, layer4.1, layer4.0, layer3.1``.
    """
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in reversed(list(module.named_children())):
            if len(out) > n_blocks:
                return
            if not _has_params(child):
                continue
            full = f"{prefix}{name}"
            leaf = next(child.children(), None) is None
            if _is_container(child) and sum(_has_params(c) for c in child.children()) >= 2:
                walk(full + ".", child)
            elif not leaf or isinstance(child, nn.modules.conv._ConvNd | nn.Linear):
                out.append(full)

    walk("", model)
    return out[: n_blocks + 1]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialize every sub-module that has ``reset_parameters`` (PyTorch's own initializers), seeded."""
    torch.manual_seed(seed)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite values; NaN (without a warning) when there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass
class MprtResult:
    """Per method: the randomized blocks (cumulative) and the mean similarities after each step."""

    blocks: list[str]
    spearman: dict[str, list[float]]
    ssim: dict[str, list[float]]
    unreliable: dict[str, bool]


def mprt(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    methods: Sequence[str],
    *,
    layer: str | None = None,
    n_blocks: int = 3,
    threshold: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> MprtResult:
    """Cascading model-parameter randomization test on a copy of ``model`` (the original is untouched).

    Args:
        model: classifier.
        images: ``[B, C, H, W]`` sample images.
        targets: ``[B]`` explained classes.
        methods: CAM methods to test.
        layer: target layer (None = auto).
        n_blocks: blocks randomized after the head.
        threshold: a method is unreliable if the mean Spearman after randomizing the head and the
            first block below it stays above this value (F.4: 0.5, heuristic).
        seed: randomization seed.
        batch_size: chunk size for perturbation methods.
        options: per-method options, as the run computes its maps (e.g. LayerCAM's fused layers, occlusion's
            window): the test must judge the maps the analyses read, not the defaults.

    Returns:
        :class:`MprtResult`.
    """
    methods = list(methods)
    opts = {m: dict((options or {}).get(m, {})) for m in methods}
    original = compute_cams(model, images, targets, methods=methods, layer=layer, batch_size=batch_size, options=opts)
    randomized = copy.deepcopy(model)
    blocks = cascade_blocks(randomized, n_blocks)
    modules = dict(randomized.named_modules())
    spearman: dict[str, list[float]] = {m: [] for m in methods}
    ssim: dict[str, list[float]] = {m: [] for m in methods}
    with model_state(randomized):
        for step, name in enumerate(blocks):
            reinitialize(modules[name], seed + step)
            now = compute_cams(
                randomized, images, targets, methods=methods, layer=layer, batch_size=batch_size, options=opts
            )
            for m in methods:
                a, b = original[m].maps, now[m].maps
                assert a is not None and b is not None
                sim = map_similarity(a, b)
                spearman[m].append(_nanmean(sim["spearman"]))
                ssim[m].append(_nanmean(sim["ssim"]))
    check = min(1, len(blocks) - 1)
    unreliable = {m: bool(spearman[m][check] > threshold) for m in methods}
    return MprtResult(blocks, spearman, ssim, unreliable)


def method_agreement(maps: dict[str, Tensor], size: int = 32) -> dict[tuple[str, str], np.ndarray]:
    """Per-sample Spearman correlation between every pair of methods' ``[B, H, W]`` maps.

    Maps are average-pooled to ``size x size`` first (rank correlation of 50k pixels dominated by ties
    and upsampling says little more).
    """
    pooled = {
        k: torch.nn.functional.adaptive_avg_pool2d(v[:, None].float(), size)[:, 0].flatten(1).cpu().double().numpy()
        for k, v in maps.items()
    }
    names = list(pooled)
    return {(a, b): spearman_rows(pooled[a], pooled[b]) for i, a in enumerate(names) for b in names[i + 1 :]}

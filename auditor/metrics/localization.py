"""Localization metrics: how much of a map falls on the object (needs masks or boxes).

Every metric returns NaN for an empty mask (nothing to localize) and for an all-zero map (nothing
localized); an empty mask is never a pointing-game hit (Quantus 0.6.0 scores it as one). Chance levels
are stored beside each value: a uniform map, a random map and a random point score about the object's
area fraction ``a``, so large objects inflate every localization metric.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from auditor.metrics.registry import MetricInputs, MetricResult, pixel_ranks, register_metric, tie_broken
from auditor.ops import minmax

NAN = float("nan")


def _undefined(maps: Tensor, masks: Tensor) -> Tensor:
    """``[B]`` bool: empty mask or zero map."""
    return (masks.flatten(1).sum(1) == 0) | (maps.flatten(1).amax(1) <= 0)


def _nan_where(value: Tensor, bad: Tensor) -> Tensor:
    return torch.where(bad, torch.full_like(value, NAN), value)


def area_fraction(masks: Tensor) -> Tensor:
    """``[B]`` fraction of the image covered by the mask (the chance level ``a``)."""
    return masks.flatten(1).float().mean(1)


@register_metric(
    "energy_in_mask",
    charted=True,
    family="localization",
    direction="higher",
    needs="mask",
    cost="0",
    reference="Energy-based pointing game (Score-CAM, arXiv:1910.01279) = relevance mass accuracy "
    "(CLEVR-XAI, arXiv:2003.07258)",
    chance=True,
)
def energy_in_mask(inputs: MetricInputs) -> MetricResult:
    """Share of the L1-normalized map's mass inside the mask: ``sum_{mask} M / sum M``. Chance: ``a``."""
    masks = inputs.require_masks("energy_in_mask")
    maps = inputs.maps.float()
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    value = inside / total.clamp_min(1e-30)
    a = area_fraction(masks)
    return MetricResult(
        _nan_where(value, _undefined(maps, masks)),
        {"energy_in_mask_chance": _nan_where(a, a == 0)},
    )


@register_metric(
    "energy_outside_mask",
    family="localization",
    direction="lower",
    needs="mask",
    cost="0",
    reference="1 - relevance mass accuracy (CLEVR-XAI, arXiv:2003.07258)",
    chance=True,
)
def energy_outside_mask(inputs: MetricInputs) -> MetricResult:
    """Share of the L1-normalized map's mass outside the mask. Chance: ``1 - a``."""
    inside = energy_in_mask(inputs)
    a = inside.extras["energy_in_mask_chance"]
    return MetricResult(1 - inside.value, {"energy_outside_mask_chance": 1 - a})


def disk_kernel(radius: float, device: torch.device) -> Tensor:
    """``[k, k]`` float kernel of the integer offsets strictly closer than ``radius`` to the centre."""
    r = max(0, math.ceil(radius) - 1)
    offs = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    return ((offs[:, None] ** 2 + offs[None, :] ** 2) < radius**2).float()


def disk_reach(masks: Tensor, radius: float) -> Tensor:
    """``[B, H, W]`` bool: pixels strictly closer than ``radius`` to a mask pixel (a dilation by a disk).

    Small disks use a direct convolution; large ones an FFT convolution (exact here: the sums are
    integers and float error is far below the 0.5 threshold), which keeps a 15 px tolerance at 224 px
    cheap (a direct 29 x 29 convolution costs ~15 ms per image on a CPU).
    """
    if radius <= 0:
        return torch.zeros_like(masks)
    kernel = disk_kernel(radius, masks.device)
    k = kernel.shape[0]
    r = k // 2
    x = masks.float()
    if k <= 9:
        hit = F.conv2d(x[:, None], kernel[None, None], padding=r)[:, 0]
    else:
        h, w = masks.shape[-2:]
        size = (h + k - 1, w + k - 1)
        spectrum = torch.fft.rfft2(x, s=size) * torch.fft.rfft2(kernel, s=size)
        hit = torch.fft.irfft2(spectrum, s=size)[:, r : r + h, r : r + w]
    return hit > 0.5


@register_metric(
    "pointing_game",
    charted=True,
    family="localization",
    direction="higher",
    needs="mask",
    cost="0",
    reference="Zhang et al., Excitation Backprop, arXiv:1608.00507 (TorchRay benchmark: 15 px tolerance)",
    options={"tolerance": 15.0, "seed": 0},
    chance=True,
)
def pointing_game(inputs: MetricInputs, tolerance: float, seed: int) -> MetricResult:
    """Hit (1.0) if a mask pixel lies strictly within ``tolerance`` of the map's maximum, else 0.0.

    ``tolerance`` is in pixels of the *original* image and is scaled by ``inputs.scale`` to the evaluated
    resolution (the benchmark works at ~500 px originals). Ties among maximal pixels are broken by seeded
    noise. Chance: the fraction of pixels within the tolerance of the mask (a uniformly random point).
    """
    masks = inputs.require_masks("pointing_game")
    maps = inputs.maps
    b, h, w = maps.shape
    scale = inputs.scale if inputs.scale is not None else torch.ones(b, device=maps.device)
    radius = tolerance * scale.float()
    flat_idx = tie_broken(maps, seed).flatten(1).argmax(1)
    u, v = (flat_idx // w).float(), (flat_idx % w).float()
    rows = torch.arange(h, device=maps.device, dtype=torch.float32)
    cols = torch.arange(w, device=maps.device, dtype=torch.float32)
    d2 = (rows[None, :, None] - u[:, None, None]) ** 2 + (cols[None, None, :] - v[:, None, None]) ** 2
    nearest = torch.where(masks, d2, torch.full_like(d2, float("inf"))).flatten(1).amin(1)
    hit = (nearest < radius**2) | (radius <= 0) & masks.flatten(1)[torch.arange(b), flat_idx]
    chance = torch.empty(b, device=maps.device)
    for r in torch.unique(radius).tolist():  # one dilation per distinct tolerance (usually one)
        sel = radius == r
        chance[sel] = disk_reach(masks[sel], r).flatten(1).float().mean(1)
    bad = _undefined(maps, masks)
    return MetricResult(
        _nan_where(hit.float(), bad),
        {"pointing_game_chance": _nan_where(chance, masks.flatten(1).sum(1) == 0)},
    )


def _top_k_overlap(inputs: MetricInputs, masks: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(|top-K pixels of the map ∩ mask|, K) with K = |mask|, ties broken by seeded noise.

    Cached per seed: relevance rank accuracy and mask IoU share one ranking of every pixel.
    """
    key = f"top_k_overlap:{seed}"
    if key not in inputs.cache:
        rank = pixel_ranks(inputs.maps, seed)
        k = masks.flatten(1).sum(1)
        top = rank < k[:, None]
        inputs.cache[key] = ((top & masks.flatten(1)).sum(1).float(), k.float())
    value: tuple[Tensor, Tensor] = inputs.cache[key]
    return value


@register_metric(
    "relevance_rank_accuracy",
    charted=True,
    family="localization",
    direction="higher",
    needs="mask",
    cost="0",
    reference="Arras et al., CLEVR-XAI, arXiv:2003.07258",
    options={"seed": 0},
    chance=True,
)
def relevance_rank_accuracy(inputs: MetricInputs, seed: int) -> MetricResult:
    """``|top-K ∩ mask| / K`` with ``K = |mask|`` (ties broken by seeded noise). Chance: ``a``."""
    masks = inputs.require_masks("relevance_rank_accuracy")
    inter, k = _top_k_overlap(inputs, masks, seed)
    a = area_fraction(masks)
    return MetricResult(
        _nan_where(inter / k.clamp_min(1), _undefined(inputs.maps, masks)),
        {"relevance_rank_accuracy_chance": _nan_where(a, a == 0)},
    )


@register_metric(
    "mask_iou",
    family="localization",
    direction="higher",
    needs="mask",
    cost="0",
    reference="IoU of the top-|mask| pixels with the mask (= RRA / (2 - RRA)); threshold-free",
    options={"seed": 0},
    chance=True,
)
def mask_iou(inputs: MetricInputs, seed: int) -> MetricResult:
    """IoU between the mask and the map's ``|mask|`` highest pixels. Chance: ``a / (2 - a)``."""
    masks = inputs.require_masks("mask_iou")
    inter, k = _top_k_overlap(inputs, masks, seed)
    a = area_fraction(masks)
    return MetricResult(
        _nan_where(inter / (2 * k - inter).clamp_min(1), _undefined(inputs.maps, masks)),
        {"mask_iou_chance": _nan_where(a / (2 - a), a == 0)},
    )


# ------------------------------------------------------------------------------------------ boxes


def boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """``[n, 4]`` bounding boxes ``x0, y0, x1, y1`` (exclusive ends) of the mask's 8-connected components."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    out = np.zeros((n, 4), dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[n, m]`` of boxes ``x0, y0, x1, y1`` with exclusive ends (pixel-area convention)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.asarray(inter / np.maximum(union, 1e-12))


def best_box_iou(cam: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Best IoU between any CAM box and any ground-truth box, for each threshold (``[T]``): the reference.

    One labelling per threshold; :func:`auditor.metrics.components.box_iou_curve` computes the same curve
    in one pass and is what ``box_iou`` uses.

    The map is min-max normalized; at threshold ``t`` the region ``cam > t`` (strict, as wsolevaluation's
    ``cv2.threshold``) is split into 8-connected components, each giving a box (MaxBoxAccV2: all contours,
    best match).
    """
    norm = minmax(cam, (0, 1))
    out = np.zeros(len(thresholds))
    for i, t in enumerate(thresholds):
        boxes = boxes_from_mask(norm > t)
        if len(boxes):
            out[i] = box_iou_matrix(boxes, gt).max()
    return out


def _gt_boxes(inputs: MetricInputs, masks: Tensor) -> list[np.ndarray]:
    """Given boxes per image; an image without boxes uses the boxes of its mask's components."""
    given = inputs.boxes or [torch.zeros(0, 4)] * len(masks)
    out = []
    for box, mask in zip(given, masks.cpu().numpy(), strict=True):
        b = box.detach().cpu().double().numpy().reshape(-1, 4)
        out.append(b if len(b) else boxes_from_mask(mask))
    return out


@register_metric(
    "box_iou",
    family="localization",
    direction="higher",
    needs="mask",
    cost="0 (one union-find pass over the map's runs for every threshold)",
    reference="Choe et al., Evaluating WSOL Right, arXiv:2001.07437 (MaxBoxAccV2 boxes); CAM paper's 20% threshold",
    options={"threshold": 0.2, "curve_step": 0.05},
    curves=("box_iou_curve",),
    host=True,
)
def box_iou(inputs: MetricInputs, threshold: float, curve_step: float) -> MetricResult:
    """Best IoU between boxes of the map thresholded at ``threshold`` x max and the ground-truth boxes.

    Ground-truth boxes are the given boxes, else the boxes of the mask's connected components. The extra
    ``box_iou_curve`` ``[B, T]`` holds the best IoU at thresholds ``0, step, 2 step, ... < 1``; the
    dataset-level ``max_box_acc`` (MaxBoxAccV2) is computed from those curves (:func:`max_box_acc`).
    """
    from auditor.metrics.components import box_iou_curve  # numba compiles on first use

    masks = inputs.require_masks("box_iou")
    cams = inputs.maps.detach().float().cpu().numpy()
    gts = _gt_boxes(inputs, masks)
    grid = np.arange(0.0, 1.0 - 1e-9, curve_step)
    on_grid = np.flatnonzero(grid == threshold)  # then the curve already holds the value
    values, curves = [], []
    for cam, gt in zip(cams, gts, strict=True):
        if len(gt) == 0 or cam.max() <= 0:
            values.append(NAN)
            curves.append(np.full(len(grid), NAN))
            continue
        curve = box_iou_curve(cam, gt, grid)
        values.append(float(curve[on_grid[0]] if len(on_grid) else box_iou_curve(cam, gt, np.array([threshold]))[0]))
        curves.append(curve)
    dev = inputs.maps.device
    return MetricResult(
        torch.tensor(values, dtype=torch.float32, device=dev),
        {"box_iou_curve": torch.tensor(np.stack(curves), dtype=torch.float32, device=dev)},
    )


def max_box_acc(curves: np.ndarray, deltas: tuple[float, ...] = (0.3, 0.5, 0.7)) -> float:
    """MaxBoxAccV2 over a set of samples: ``mean_delta max_t mean_n 1[IoU_n(t) >= delta]``.

    Args:
        curves: ``[N, T]`` best IoU per sample and threshold (``box_iou_curve``); rows with NaN are skipped.
        deltas: IoU cut-offs (wsolevaluation: 0.3, 0.5, 0.7).

    Returns:
        The accuracy in [0, 1], NaN when no sample has a defined curve.
    """
    curves = curves[~np.isnan(curves).any(1)]
    if len(curves) == 0:
        return NAN
    return float(np.mean([(curves >= d).mean(0).max() for d in deltas]))

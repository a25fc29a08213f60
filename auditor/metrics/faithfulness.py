"""Faithfulness metrics: does removing what the map points at change the model's output?

All scores are softmax probabilities of the explained class. Every perturbed input of a batch is built
per chunk and evaluated in large batched forwards, never one forward per step per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import splu
from torch import Tensor

from auditor.cams.speed import balanced_chunks
from auditor.metrics.registry import MetricInputs, MetricResult, pixel_ranks, register_metric
from auditor.ops import minmax, separable_blur


def gaussian_blur(x: Tensor, klen: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's insertion substrate: per-channel ``conv2d`` with a ``klen x klen`` Gaussian, zero padding.

    The kernel is ``scipy.ndimage.gaussian_filter`` of a centred delta (RISE's ``gkern``), which is the
    normalized sampled Gaussian truncated at 4 sigma.
    """
    from scipy.ndimage import gaussian_filter1d

    delta = np.zeros(klen)
    delta[klen // 2] = 1
    # gaussian_filter of a 2-D delta is separable: the outer product of the 1-D filter of a 1-D delta
    return separable_blur(x, gaussian_filter1d(delta, sigma))


def causal_curves(inputs: MetricInputs, mode: str, step: float, seed: int) -> Tensor:
    """Deletion or insertion curves ``[B, n + 1]`` (RISE ``CausalMetric``), batched over images x steps.

    Pixels are ordered by decreasing saliency; at step ``k`` the first ``min(k*s, HW)`` of them are copied
    from the finish image into the start image (``s = ceil(step * HW)``, ``n = ceil(HW / s)``).
    Deletion: start = x, finish = 0 (the dataset-mean colour in normalized space).
    Insertion: start = blur(x) (11 x 11 Gaussian, sigma 5), finish = x.
    """
    _, images, targets = inputs.require_model(mode)
    b, _, h, w = images.shape
    hw = h * w
    s = max(1, math.ceil(step * hw))
    n = math.ceil(hw / s)
    rank = pixel_ranks(inputs.maps, seed)
    if mode == "deletion":
        start, finish = images, torch.zeros_like(images)
    else:
        start, finish = gaussian_blur(images), images
    jobs = b * (n + 1)
    probs = torch.empty(jobs, device=images.device)
    for sl in balanced_chunks(jobs, inputs.batch_size):
        job = torch.arange(sl.start, sl.stop, device=images.device)
        img, k = job // (n + 1), job % (n + 1)
        copied = (rank[img] < (k * s)[:, None]).view(-1, 1, h, w)
        x = torch.where(copied, finish[img], start[img])
        probs[job] = inputs.probs(x, targets[img])
    return probs.view(b, n + 1)


def trapezoid_auc(curve: Tensor) -> Tensor:
    """RISE's AUC on [0, 1]: ``(sum p - p_0 / 2 - p_n / 2) / n`` for ``[B, n + 1]`` curves."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def _causal(inputs: MetricInputs, mode: str, step: float, seed: int) -> MetricResult:
    curve = causal_curves(inputs, mode, step, seed)
    auc = trapezoid_auc(curve)
    base = inputs.base_probs()
    undefined = inputs.maps.flatten(1).amax(1) <= 0
    nan = torch.full_like(auc, float("nan"))
    return MetricResult(
        torch.where(undefined, nan, auc),
        {f"{mode}_auc_norm": torch.where(undefined, nan, auc / base.clamp_min(1e-12)), f"{mode}_curve": curve},
    )


@register_metric(
    "deletion_auc",
    charted=True,
    family="faithfulness",
    direction="lower",
    needs="model",
    cost="1 + 1/step (51 at the default step 0.02)",
    reference="Petsiuk et al., RISE, arXiv:1806.07421 (eclique/RISE CausalMetric)",
    options={"step": 0.02, "seed": 0},  # worst AUC error vs step 0.01: 0.0037 (benchmarks/deletion_steps.py)
    expensive=True,
    columns=("deletion_auc_norm",),
    curves=("deletion_curve",),
)
def deletion_auc(inputs: MetricInputs, step: float, seed: int) -> MetricResult:
    """Deletion AUC (lower = more faithful); extras ``deletion_auc_norm`` (AUC / p(x)) and the curve."""
    return _causal(inputs, "deletion", step, seed)


@register_metric(
    "insertion_auc",
    charted=True,
    family="faithfulness",
    direction="higher",
    needs="model",
    cost="1 + 1/step (51 at the default step 0.02)",
    reference="Petsiuk et al., RISE, arXiv:1806.07421 (eclique/RISE CausalMetric)",
    options={"step": 0.02, "seed": 0},  # worst AUC error vs step 0.01: 0.0037 (benchmarks/deletion_steps.py)
    expensive=True,
    columns=("insertion_auc_norm",),
    curves=("insertion_curve",),
)
def insertion_auc(inputs: MetricInputs, step: float, seed: int) -> MetricResult:
    """Insertion AUC (higher = more faithful); extras ``insertion_auc_norm`` and the curve."""
    return _causal(inputs, "insertion", step, seed)


def _explanation_probs(inputs: MetricInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(p(x), p(E), mean of the normalized map) with ``E = minmax(map) * x`` in pixel space (cached)."""
    if "explanation" not in inputs.cache:
        _, images, targets = inputs.require_model("average_drop")
        norm = minmax(inputs.maps.float(), (1, 2))
        explained = inputs.from_pixels(inputs.to_pixels(images) * norm[:, None])
        inputs.cache["explanation"] = (inputs.base_probs(), inputs.probs(explained, targets), norm.flatten(1).mean(1))
    value: tuple[Tensor, Tensor, Tensor] = inputs.cache["explanation"]
    return value


@register_metric(
    "average_drop",
    family="faithfulness",
    direction="lower",
    needs="model",
    cost="1",
    reference="Chattopadhyay et al., Grad-CAM++, arXiv:1710.11063",
    expensive=True,
    columns=("map_mean",),
)
def average_drop(inputs: MetricInputs) -> MetricResult:
    """``max(0, p(x) - p(E)) / p(x)`` with ``E = minmax(map) * x`` (pixel space); its mean is Average Drop.

    An all-ones map scores a perfect 0, so the extra ``map_mean`` (mean of the normalized map, the share
    of the image kept) is stored beside it.
    """
    base, explained, kept = _explanation_probs(inputs)
    undefined = inputs.maps.flatten(1).amax(1) <= 0
    drop = (base - explained).clamp_min(0) / base.clamp_min(1e-12)
    return MetricResult(torch.where(undefined, torch.full_like(drop, float("nan")), drop), {"map_mean": kept})


@register_metric(
    "increase_in_confidence",
    family="faithfulness",
    direction="higher",
    needs="model",
    cost="1 (shared with average_drop)",
    reference="Chattopadhyay et al., Grad-CAM++, arXiv:1710.11063",
    expensive=True,
)
def increase_in_confidence(inputs: MetricInputs) -> MetricResult:
    """1.0 where ``p(E) > p(x)`` else 0.0; its mean is the Increase in Confidence rate."""
    base, explained, _ = _explanation_probs(inputs)
    undefined = inputs.maps.flatten(1).amax(1) <= 0
    inc = (explained > base).float()
    return MetricResult(torch.where(undefined, torch.full_like(inc, float("nan")), inc))


# ------------------------------------------------------------------------------------------ ROAD

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
_DIRECT, _DIAGONAL = 1 / 6, 1 / 12
_NEIGHBOURS = [
    (-1, 0, _DIRECT),
    (1, 0, _DIRECT),
    (0, -1, _DIRECT),
    (0, 1, _DIRECT),
    (-1, -1, _DIAGONAL),
    (-1, 1, _DIAGONAL),
    (1, -1, _DIAGONAL),
    (1, 1, _DIAGONAL),
]


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """ROAD's noisy linear imputation (tleemann/road_evaluation ``NoisyLinearImputer``).

    Each removed pixel equals the weighted mean of its 8 neighbours (weight 1/6 direct, 1/12 diagonal;
    out-of-image neighbours dropped). All removed pixels are solved jointly as one sparse linear system
    (one LU factorization, one right-hand side per channel), then ``sigma * N(0, 1)`` noise is added.

    Args:
        image: ``[C, H, W]`` float64 image in [0, 1] pixel space.
        removed: ``[H, W]`` bool, pixels to impute.
        sigma: noise standard deviation (0.01 in ROAD).
        rng: numpy generator for the noise.

    Returns:
        ``[C, H, W]`` imputed image.
    """
    c, h, w = image.shape
    idx = np.flatnonzero(removed.ravel())
    out = image.copy()
    if idx.size == 0:
        return out
    var = -np.ones(h * w, dtype=np.int64)
    var[idx] = np.arange(idx.size)
    ys, xs = np.divmod(idx, w)
    rows, cols, vals = [], [], []
    diag = np.zeros(idx.size)
    rhs = np.zeros((idx.size, c))
    flat = image.reshape(c, -1)
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[ok] += wt
        nb = ny[ok] * w + nx[ok]
        unknown = var[nb] >= 0
        src = np.flatnonzero(ok)
        rows.append(src[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        rhs[src[~unknown]] += wt * flat[:, nb[~unknown]].T
    rows.append(np.arange(idx.size))
    cols.append(np.arange(idx.size))
    vals.append(diag)
    matrix = sparse.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(idx.size, idx.size)
    )
    solved = splu(matrix).solve(rhs)  # [n, C]
    out.reshape(c, -1)[:, idx] = solved.T + sigma * rng.standard_normal((c, idx.size))
    return out


def road_curves(inputs: MetricInputs, fractions: tuple[float, ...], sigma: float, seed: int) -> tuple[Tensor, Tensor]:
    """(MoRF, LeRF) probabilities ``[B, P]``: the top / bottom ``p`` fraction of pixels imputed.

    Imputation runs on the [0, 1] image before normalization, as in road_evaluation (pytorch-grad-cam
    imputes the normalized tensor, which shrinks the noise).
    """
    _, images, targets = inputs.require_model("road")
    b, _, h, w = images.shape
    rank = pixel_ranks(inputs.maps, seed).cpu().numpy()
    pixels = inputs.to_pixels(images).detach().double().cpu().numpy()
    keys = inputs.sample_keys.tolist() if inputs.sample_keys is not None else list(range(b))
    rngs = [np.random.default_rng([seed, int(k)]) for k in keys]  # per sample: batches do not move it
    hw = h * w
    imputed = []
    for order in ("morf", "lerf"):
        for p in fractions:
            count = int(p * hw)
            for i in range(b):
                removed = rank[i] < count if order == "morf" else rank[i] >= hw - count
                imputed.append(noisy_linear_impute(pixels[i], removed.reshape(h, w), sigma, rngs[i]))
    x = torch.tensor(np.stack(imputed), dtype=images.dtype, device=images.device)
    x = inputs.from_pixels(x)
    order_idx = torch.arange(b, device=images.device).repeat(2 * len(fractions))
    probs = inputs.probs(x, targets[order_idx]).view(2, len(fractions), b)
    return probs[0].T, probs[1].T


def _road(
    inputs: MetricInputs, fractions: tuple[float, ...] | list[float], sigma: float, seed: int
) -> tuple[Tensor, Tensor]:
    key = f"road:{tuple(fractions)}:{sigma}:{seed}"
    if key not in inputs.cache:
        inputs.cache[key] = road_curves(inputs, tuple(fractions), sigma, seed)
    value: tuple[Tensor, Tensor] = inputs.cache[key]
    return value


_ROAD_OPTIONS = {"fractions": ROAD_FRACTIONS, "sigma": 0.01, "seed": 0}
_ROAD_REF = "Rong et al., ROAD, arXiv:2202.00449 (tleemann/road_evaluation noisy linear imputation)"


def _masked(value: Tensor, inputs: MetricInputs) -> Tensor:
    undefined = inputs.maps.flatten(1).amax(1) <= 0
    return torch.where(undefined, torch.full_like(value, float("nan")), value)


@register_metric(
    "road_morf",
    family="faithfulness",
    direction="lower",
    needs="model",
    cost="7 sparse solves + 7 forwards",
    reference=_ROAD_REF,
    options=_ROAD_OPTIONS,
    expensive=True,
    curves=("road_morf_curve",),
)
def road_morf(inputs: MetricInputs, fractions: tuple[float, ...], sigma: float, seed: int) -> MetricResult:
    """Mean probability over ``fractions`` after imputing the most relevant ``p`` of the pixels (lower = better)."""
    morf, _ = _road(inputs, fractions, sigma, seed)
    return MetricResult(_masked(morf.mean(1), inputs), {"road_morf_curve": morf})


@register_metric(
    "road_lerf",
    family="faithfulness",
    direction="higher",
    needs="model",
    cost="7 sparse solves + 7 forwards",
    reference=_ROAD_REF,
    options=_ROAD_OPTIONS,
    expensive=True,
    curves=("road_lerf_curve",),
)
def road_lerf(inputs: MetricInputs, fractions: tuple[float, ...], sigma: float, seed: int) -> MetricResult:
    """Mean probability over ``fractions`` after imputing the least relevant ``p`` of the pixels (higher = better)."""
    _, lerf = _road(inputs, fractions, sigma, seed)
    return MetricResult(_masked(lerf.mean(1), inputs), {"road_lerf_curve": lerf})


@register_metric(
    "road_combined",
    family="faithfulness",
    direction="higher",
    needs="model",
    cost="14 sparse solves + 14 forwards (shared with road_morf/road_lerf)",
    reference=_ROAD_REF,
    options=_ROAD_OPTIONS,
    expensive=True,
)
def road_combined(inputs: MetricInputs, fractions: tuple[float, ...], sigma: float, seed: int) -> MetricResult:
    """``(mean_p LeRF - mean_p MoRF) / 2`` = pytorch-grad-cam's ROADCombined on probability drops."""
    morf, lerf = _road(inputs, fractions, sigma, seed)
    return MetricResult(_masked((lerf.mean(1) - morf.mean(1)) / 2, inputs))

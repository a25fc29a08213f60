"""Operations shared across families, written once: per-slice min–max, separable blur, pixel conversion.

They take numpy arrays or torch tensors where both occur, and import torch only when given tensors, so
torch-free modules (the report) can use them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

ArrayT = TypeVar("ArrayT", "np.ndarray", "Tensor")


def minmax(x: ArrayT, axes: tuple[int, ...], eps: float = 1e-12) -> ArrayT:
    """Per-slice min–max normalization to ``[0, 1]`` over ``axes``; a constant slice becomes 0.

    Args:
        x: numpy array or torch tensor, e.g. ``[B, H, W]`` maps with ``axes=(1, 2)``.
        axes: the axes each slice spans.
        eps: smallest range divided by.
    """
    if isinstance(x, np.ndarray):
        lo = x.min(axis=axes, keepdims=True)
        return (x - lo) / np.maximum(x.max(axis=axes, keepdims=True) - lo, eps)
    lo_t = x.amin(dim=axes, keepdim=True)
    return (x - lo_t) / (x.amax(dim=axes, keepdim=True) - lo_t).clamp_min(eps)


def gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    """Sampled, normalized 1-D Gaussian of ``2 * radius + 1`` taps (default radius ``3 sigma``)."""
    r = max(1, int(3 * sigma)) if radius is None else radius
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def separable_blur(x: Tensor, kernel: np.ndarray | Sequence[float]) -> Tensor:
    """Per-channel blur of ``[B, C, H, W]`` by the outer product of a 1-D ``kernel`` with itself (zero padding).

    One convolution along the rows, one along the columns; the kernel length must be odd.
    """
    import torch
    import torch.nn.functional as F

    k = torch.as_tensor(np.asarray(kernel, np.float64), dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def to_pixels(x: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """Normalized ``[B, C, H, W]`` -> pixel space (``x * std + mean``; identity without a normalization)."""
    if mean is None or std is None:
        return x
    return x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)


def from_pixels(x: Tensor, mean: Tensor | None, std: Tensor | None) -> Tensor:
    """Pixel space ``[B, C, H, W]`` -> normalized (``(x - mean) / std``)."""
    if mean is None or std is None:
        return x
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source taps of each output index (``align_corners=False``, as torch's ``interpolate``)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes of ``[..., h, w]`` to ``size`` (``align_corners=False``, no antialias).

    The same sampling as ``torch.nn.functional.interpolate(mode="bilinear")``, in numpy, so that modules
    which read finished runs need no torch.
    """
    i0, i1, wy = _source_index(x.shape[-2], size[0])
    j0, j1, wx = _source_index(x.shape[-1], size[1])
    rows = x[..., i0, :] * (1 - wy)[:, None] + x[..., i1, :] * wy[:, None]
    return np.asarray(rows[..., j0] * (1 - wx) + rows[..., j1] * wx)


def factorize(acts: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deep Feature Factorization (Collins et al. 2018): non-negative matrix factorization of activations.

    As pytorch-grad-cam's ``dff``: the ``K x N`` matrix of activations (``N`` positions, of one image or many)
    is shifted per channel by its minimum so it is non-negative, then ``V - offset ~ W H`` with ``n``
    concepts; a concept's embedding in activation space is ``W + offset``. Initialisation is NNDSVDa, so the
    result is deterministic (pytorch-grad-cam draws a random initialisation with ``random_state=0``).

    Args:
        acts: ``[K, N]`` activations (NaN read as 0).
        n_components: number of concepts ``n`` (capped at ``min(K, N)``).

    Returns:
        ``(W [K, n] >= 0, heat H [n, N] >= 0, offset [K, 1])``; all-zero ``W`` and ``H`` for constant activations.
    """
    from sklearn.decomposition import NMF

    v = np.nan_to_num(np.asarray(acts, dtype=np.float64))
    offset = v.min(axis=1, keepdims=True)
    v = v - offset
    n = max(1, min(n_components, *v.shape))
    if not np.any(v > 0):
        return np.zeros((v.shape[0], n)), np.zeros((n, v.shape[1])), offset
    model = NMF(n_components=n, init="nndsvda", max_iter=400)
    with warnings.catch_warnings():  # slow convergence on tiny maps is expected; the result is still used
        warnings.filterwarnings("ignore", message="Maximum number of iterations")
        w = model.fit_transform(v)
    return w, model.components_, offset


def project_concepts(acts: np.ndarray, embeddings: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Heat of fixed concepts in new activations: ``V - offset ~ W H`` for ``H >= 0`` with ``W`` fixed.

    Args:
        acts: ``[K, N]`` activations.
        embeddings: ``[K, n]`` the ``W`` of :func:`factorize`.
        offset: ``[K, 1]`` the shift of that fit.

    Returns:
        ``[n, N]`` heat.
    """
    from sklearn.decomposition import non_negative_factorization

    v = np.clip(np.nan_to_num(acts.astype(np.float64)) - offset, 0, None)
    if not np.any(v > 0) or not np.any(embeddings > 0):
        return np.zeros((embeddings.shape[1], v.shape[1]))
    heat, _, _ = non_negative_factorization(
        v.T, n_components=embeddings.shape[1], init="custom", H=embeddings.T, update_H=False, max_iter=400
    )
    return np.asarray(heat).T

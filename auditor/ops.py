"""Operations shared across families, written once: per-slice min–max, separable blur, pixel conversion.

They take numpy arrays or torch tensors where both occur, and import torch only when given tensors, so
torch-free modules (the report) can use them.
"""

from __future__ import annotations

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

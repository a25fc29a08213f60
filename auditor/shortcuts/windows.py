"""The windows the interventions fill in or move, as normalized ``[x0, y0, x1, y1]`` boxes: the region scan's grid
and edge bands, growing and anchoring a located region, and reading a region off per-window drops. Pure
geometry on floats and arrays, shared by the analyses that scan (``cues``, ``subsets``, ``backdrop``) and by the
cost estimate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

FINE = 64  # side of the importance grid the region is read from


def grid_boxes(window: float, stride: float, within: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> list[list[float]]:
    """Normalized ``[x0, y0, x1, y1]`` windows of side ``window`` every ``stride`` inside ``within``, the
    last flush with its edge (row-major)."""

    def starts(lo: float, hi: float) -> list[float]:
        span = max(hi - lo - window, 0.0)
        k = int(np.floor(span / stride + 1e-9))
        out = [lo + i * stride for i in range(k + 1)]
        if out[-1] < lo + span - 1e-9:
            out.append(lo + span)
        return out

    return [
        [x, y, min(x + window, 1.0), min(y + window, 1.0)]
        for y in starts(within[1], within[3])
        for x in starts(within[0], within[2])
    ]


def band_boxes(
    width: float, stride: float, within: Sequence[float] = (0.0, 0.0, 1.0, 1.0), axis: str = "both"
) -> list[list[float]]:
    """Bands of ``width`` every ``stride`` across ``within``: horizontal (full width of ``within``; ``axis``
    ``"h"``), vertical (``"v"``) or both. A cue that spans the image (a sky, a letterbox bar) has no window of
    the grid that holds it; a band does."""

    def starts(lo: float, hi: float) -> list[float]:
        n = max(1, int(np.floor((hi - lo - width) / stride + 1e-9)) + 1)
        return [min(lo + i * stride, hi - width) for i in range(n)]

    x0, y0, x1, y1 = within
    out = []
    if axis in ("h", "both"):
        out += [[x0, y, x1, y + width] for y in starts(y0, y1)]
    if axis in ("v", "both"):
        out += [[x, y0, x + width, y1] for x in starts(x0, x1)]
    return [[float(v) for v in b] for b in out]


def edge_bands(width: float) -> list[list[float]]:
    """The four bands of ``width`` along the image's edges (top, bottom, left, right). Cues that span the image
    sit there (a sky, the ground, a letterbox bar, a scanner's ruler); a band across the middle would hold the
    objects, which sit near the centre, in most images."""
    return [[0.0, 0.0, 1.0, width], [0.0, 1 - width, 1.0, 1.0], [0.0, 0.0, width, 1.0], [1 - width, 0.0, 1.0, 1.0]]


def band_axis(box: Sequence[float]) -> str | None:
    """``"h"`` for a full-width band, ``"v"`` for a full-height one, else None."""
    if box[2] - box[0] >= 0.999 and box[3] - box[1] < 0.999:
        return "h"
    if box[3] - box[1] >= 0.999 and box[2] - box[0] < 0.999:
        return "v"
    return None


def grow(region: Sequence[float], by: float) -> list[float]:
    """``region`` grown by ``by`` on each side, within the image."""
    x0, y0, x1, y1 = (float(v) for v in region)
    return [max(x0 - by, 0.0), max(y0 - by, 0.0), min(x1 + by, 1.0), min(y1 + by, 1.0)]


def anchor(region: Sequence[float], band: Sequence[float]) -> list[float]:
    """``region`` extended to every image edge ``band`` lies along. A sky or a letterbox bar starts at the edge:
    a refined region that stops short of it leaves a strip of the cue, from which the removal refills the rest."""
    out = [float(v) for v in region]
    for i, edge in ((0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)):
        if abs(band[i] - edge) < 1e-9:
            out[i] = edge
    return out


def importance(boxes: Sequence[Sequence[float]], values: np.ndarray, side: int = FINE) -> np.ndarray:
    """``[side, side]``: per pixel, the mean of ``values`` over the boxes that cover it (NaN: none)."""
    total, count = np.zeros((side, side)), np.zeros((side, side))
    for box, v in zip(boxes, values, strict=True):
        x0, y0 = int(np.floor(box[0] * side)), int(np.floor(box[1] * side))
        x1, y1 = int(np.ceil(box[2] * side)), int(np.ceil(box[3] * side))
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def locate(imp: np.ndarray, level: float = 0.5) -> list[float]:
    """The bounding box (normalized) of the connected pixels within ``level`` of the peak of ``imp``."""
    filled = np.nan_to_num(imp, nan=-np.inf)
    peak = np.unravel_index(np.argmax(filled), filled.shape)
    labels, _ = ndimage.label(filled >= level * filled[peak])
    ys, xs = np.nonzero(labels == labels[peak])
    side = imp.shape[0]
    return [xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side]

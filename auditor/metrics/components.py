"""MaxBoxAccV2 boxes at every threshold in one pass: a union-find over runs, levels taken from high to low.

The regions ``{norm > t}`` nest as the threshold ``t`` falls, so their 8-connected components only grow and
merge. Pixels are quantized to their level (the number of thresholds strictly below them), grouped into
horizontal runs of equal level, and the runs are added from the highest level down; each addition joins
the runs it touches (8-connectivity) in a union-find that keeps every component's bounding box. After each
level the current components are the components at that threshold, so one pass replaces one connected-
component labelling per threshold (:func:`auditor.metrics.localization.best_box_iou`, kept as the
reference; the two agree exactly, tested). Speed: ``python benchmarks/maxbox.py``.
"""

from __future__ import annotations

import numba
import numpy as np

from auditor.ops import minmax


@numba.njit(cache=True, nogil=True)
def _level(v: float, grid: np.ndarray, step: float) -> int:
    """How many thresholds lie strictly below ``v`` (a guess from a uniform step, corrected exactly)."""
    levels = grid.shape[0]
    k = min(max(int((v - grid[0]) / step) + 1, 0), levels) if step > 0 else 0
    while k > 0 and grid[k - 1] >= v:
        k -= 1
    while k < levels and grid[k] < v:
        k += 1
    return k


@numba.njit(cache=True, nogil=True)
def _runs(norm: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of equal level: ``[n, 4]`` (y, x0, x1 exclusive, level), and the run of every pixel."""
    h, w = norm.shape
    levels = grid.shape[0]
    step = (grid[-1] - grid[0]) / (levels - 1) if levels > 1 else 1.0
    runs = np.empty((h * w, 4), np.int32)
    run_at = np.empty((h, w), np.int32)
    n = 0
    for y in range(h):
        prev = -1
        for x in range(w):
            k = _level(norm[y, x], grid, step)
            if k != prev:
                runs[n, 0], runs[n, 1], runs[n, 2], runs[n, 3] = y, x, x + 1, k
                n += 1
                prev = k
            else:
                runs[n - 1, 2] = x + 1
            run_at[y, x] = n - 1
    return runs[:n], run_at, _by_level(runs[:n, 3], levels)


@numba.njit(cache=True, nogil=True)
def _by_level(lev: np.ndarray, levels: int) -> np.ndarray:
    """Run indices sorted by level, highest first, level-0 runs (below every threshold) left out."""
    counts = np.zeros(levels + 1, np.int64)
    for k in lev:
        counts[k] += 1
    start = np.zeros(levels + 2, np.int64)
    for k in range(levels - 1, -1, -1):
        start[k] = start[k + 1] + counts[k + 1]
    order = np.empty(start[0], np.int32)
    for r in range(lev.shape[0]):
        k = lev[r]
        if k > 0:
            order[start[k]] = r
            start[k] += 1
    return order


@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


@numba.njit(cache=True, nogil=True)
def _add(r: int, runs: np.ndarray, run_at: np.ndarray, parent: np.ndarray, size: np.ndarray, box: np.ndarray) -> None:
    """Add run ``r`` and join it with every added run it touches in its own and the adjacent rows."""
    h, w = run_at.shape
    y, x0, x1 = runs[r, 0], runs[r, 1], runs[r, 2]
    parent[r] = r
    box[r, 0], box[r, 1], box[r, 2], box[r, 3] = x0, y, x1, y + 1
    a = r
    for yy in range(max(y - 1, 0), min(y + 2, h)):
        for s in range(run_at[yy, max(x0 - 1, 0)], run_at[yy, min(x1, w - 1)] + 1):
            if s == r or parent[s] < 0:
                continue
            b = _find(parent, s)
            if a == b:
                continue
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            box[a, 0], box[a, 1] = min(box[a, 0], box[b, 0]), min(box[a, 1], box[b, 1])
            box[a, 2], box[a, 3] = max(box[a, 2], box[b, 2]), max(box[a, 3], box[b, 3])


@numba.njit(cache=True, nogil=True)
def _best_iou(box: np.ndarray, gt: np.ndarray) -> float:
    """Best IoU of one ``[4]`` box with any ground-truth box (as ``box_iou_matrix``: exclusive ends)."""
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    best = 0.0
    for g in range(gt.shape[0]):
        ix = min(float(box[2]), gt[g, 2]) - max(float(box[0]), gt[g, 0])
        iy = min(float(box[3]), gt[g, 3]) - max(float(box[1]), gt[g, 1])
        inter = (ix if ix > 0 else 0.0) * (iy if iy > 0 else 0.0)
        union = area + (gt[g, 2] - gt[g, 0]) * (gt[g, 3] - gt[g, 1]) - inter
        best = max(best, inter / max(union, 1e-12))
    return best


@numba.njit(cache=True, nogil=True)
def _curve(norm: np.ndarray, grid: np.ndarray, gt: np.ndarray) -> np.ndarray:
    runs, run_at, order = _runs(norm, grid)
    n = runs.shape[0]
    parent = np.full(n, -1, np.int32)
    size = np.ones(n, np.int32)
    box = np.empty((n, 4), np.int32)
    roots = np.empty(n, np.int32)
    n_roots, pos = 0, 0
    curve = np.zeros(grid.shape[0])
    for k in range(grid.shape[0], 0, -1):
        while pos < order.shape[0] and runs[order[pos], 3] == k:
            _add(order[pos], runs, run_at, parent, size, box)
            roots[n_roots] = order[pos]
            n_roots += 1
            pos += 1
        kept = 0
        for i in range(n_roots):  # the components at threshold k - 1: score them, keep the roots
            c = roots[i]
            if parent[c] == c:
                roots[kept] = c
                kept += 1
                curve[k - 1] = max(curve[k - 1], _best_iou(box[c], gt))
        n_roots = kept
    return curve


def box_iou_curve(cam: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Best IoU between any component box of ``minmax(cam) > t`` and any ground-truth box, per threshold.

    Args:
        cam: ``[H, W]`` map.
        gt: ``[m, 4]`` ground-truth boxes ``x0, y0, x1, y1`` (exclusive ends).
        thresholds: ``[T]`` strictly increasing thresholds.

    Returns:
        ``[T]`` float64, 0 where no pixel exceeds the threshold.
    """
    t = np.asarray(thresholds, np.float64)
    if len(t) > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    cam = np.asarray(cam)
    norm = minmax(cam if cam.dtype.kind == "f" else cam.astype(np.float64), (0, 1))  # the caller's precision
    return np.asarray(_curve(norm, t, np.asarray(gt, np.float64).reshape(-1, 4)))

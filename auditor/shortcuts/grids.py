"""The fixed 32 x 32 grid of the spatial analyses, and plain words for places on it (no torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from auditor.ops import resize_bilinear

GRID = 32
CHUNK = 8192  # maps or object grids handled at once where a whole-array copy would grow with the run's rows


def grid_maps(maps: np.ndarray) -> np.ndarray:
    """``[n, h, w]`` raw maps -> ``[n, 32, 32]`` float32 L1-normalized (rows with no mass or NaN become NaN)."""
    t = np.asarray(maps, dtype=np.float32)
    bad = ~np.isfinite(t).reshape(len(t), -1).all(1)
    t = np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    g = np.clip(resize_bilinear(t, (GRID, GRID)), 0, None).astype(np.float32)
    mass = g.reshape(len(g), -1).sum(1)
    g = g / np.maximum(mass, 1e-12)[:, None, None]
    g[bad | (mass <= 0)] = np.nan
    return g  # float32: 4 KiB per sample


def describe_location(box: Sequence[float]) -> str:
    """Plain words for a normalized box: 'the top-left corner', 'the bottom edge', 'the centre'."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if v and h:
        return f"the {v}-{h} corner"
    if v or h:
        return f"the {v or h} edge"
    return "the centre"


def box_cells(box: Sequence[float]) -> np.ndarray:
    """``[32, 32]`` bool: the grid cells a normalized ``[x0, y0, x1, y1]`` box touches."""
    cells = np.zeros((GRID, GRID), dtype=bool)
    x0, y0 = int(np.floor(box[0] * GRID)), int(np.floor(box[1] * GRID))
    x1, y1 = int(np.ceil(box[2] * GRID)), int(np.ceil(box[3] * GRID))
    cells[y0:y1, x0:x1] = True
    return cells


class Indexable(Protocol):
    """An array, or anything that reads rows of one when indexed (:class:`RowsOf`, ``store.rows.DiskRows``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, selection: Any, /) -> Any: ...


def by_chunk(maps: Indexable, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn(maps)`` for a per-row ``fn`` (``[k, ...] -> [k, ...]``), ``CHUNK`` rows at a time, concatenated: the
    analyses' passes over every map read the grid file a chunk at a time, not whole (4 GB at a million rows)."""
    parts = [fn(np.asarray(maps[i : i + CHUNK])) for i in range(0, len(maps), CHUNK)]
    return np.concatenate(parts) if parts else fn(np.asarray(maps[:0]))


def finite_rows(maps: Indexable) -> np.ndarray:
    """``[n]`` bool: the maps with no NaN, ``CHUNK`` rows at a time."""
    return by_chunk(maps, lambda chunk: np.isfinite(chunk).all(axis=tuple(range(1, chunk.ndim))))


def sum_rows(maps: Indexable, rows: np.ndarray) -> np.ndarray:
    """``maps[rows].sum(0)`` in float64, ``CHUNK`` rows at a time (``[32, 32]``): a copy of every map of a
    100k-row run was 400 MB on top of the maps."""
    total = np.zeros(maps.shape[1:], dtype=np.float64)
    for i in range(0, len(rows), CHUNK):
        total += np.asarray(maps[rows[i : i + CHUNK]]).sum(0, dtype=np.float64)
    return total


class RowsOf:
    """``base[rows[i]]`` for a selection ``i``, read when asked: a class's object grids from the file, not a
    float copy of every row's (4 KiB a sample: 4 GB at a million rows)."""

    def __init__(self, base: Indexable, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows
        self.shape = (len(rows), *base.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, selection: np.ndarray) -> np.ndarray:
        return np.asarray(self.base[self.rows[selection]], dtype=np.float32)


def has_object(objects: Indexable | None, rows: np.ndarray) -> np.ndarray:
    """``[len(rows)]`` bool: the images with a mask or boxes (a finite, non-empty object grid)."""
    if objects is None:
        return np.zeros(len(rows), dtype=bool)
    return _with_object(np.asarray(objects[rows], dtype=np.float32))


def _with_object(obj: np.ndarray) -> np.ndarray:
    """``[n, 32, 32]`` object grids -> ``[n]`` bool: finite and not empty."""
    return np.isfinite(obj).all(axis=(1, 2)) & (np.nan_to_num(obj).sum(axis=(1, 2)) > 0)


def object_overlap(objects: Indexable | None, rows: np.ndarray, cells: np.ndarray) -> float:
    """Mean object fraction of ``cells`` over the ``rows`` that have a mask (NaN without masks).

    Args:
        objects: ``[n, 32, 32]`` object fraction per cell (NaN rows = no mask), or None.
        rows: indices (or a bool selection) into ``objects``.
        cells: ``[32, 32]`` bool.
    """
    if objects is None:
        return float("nan")
    sel = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    total, count = 0.0, 0
    for i in range(0, len(sel), CHUNK):  # a class's object grids a chunk at a time, not all in float32
        obj = np.asarray(objects[sel[i : i + CHUNK]], dtype=np.float32)
        inside = obj[np.isfinite(obj).all(axis=(1, 2))][:, cells]
        total, count = total + float(inside.sum(dtype=np.float64)), count + inside.size
    return total / count if count else float("nan")


def object_inside(objects: Indexable | None, rows: np.ndarray, cells: np.ndarray, least: float = 0.5) -> float:
    """Share of the ``rows`` images (those with a mask) whose object lies at least ``least`` inside ``cells``:
    a region that holds most of the object in most images is the object, however large the region (NaN
    without masks).

    Args:
        objects: ``[n, 32, 32]`` object fraction per cell (NaN rows = no mask), or None.
        rows: indices into ``objects``.
        cells: ``[32, 32]`` bool.
    """
    if objects is None:
        return float("nan")
    obj = np.asarray(objects[rows], dtype=np.float32)
    has = _with_object(obj)
    if not has.any():
        return float("nan")
    inside = obj[has][:, cells].sum(1) / obj[has].sum(axis=(1, 2))
    return float((inside >= least).mean())


def control_box(region: Sequence[float]) -> list[float]:
    """A box of the region's size at the place mirrored through the image centre; when that overlaps the
    region (a central region), the corner farthest from it."""
    w, h = region[2] - region[0], region[3] - region[1]
    box = [1 - region[2], 1 - region[3], 1 - region[0], 1 - region[1]]
    if box[0] < region[2] and region[0] < box[2] and box[1] < region[3] and region[1] < box[3]:
        cx, cy = (region[0] + region[2]) / 2, (region[1] + region[3]) / 2
        x0 = 0.0 if cx >= 0.5 else 1 - w
        y0 = 0.0 if cy >= 0.5 else 1 - h
        box = [x0, y0, x0 + w, y0 + h]
    return [float(v) for v in box]

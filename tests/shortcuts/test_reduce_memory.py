"""The reduce stage's per-row arrays: the analysis grids put on the grid a chunk at a time, and the hotspots
reading a class's object grids when asked, give what the whole-array computation gives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from auditor.shortcuts import grids as grids_module
from auditor.shortcuts import hotspots, registry
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.grids import RowsOf, grid_maps, object_overlap
from auditor.shortcuts.registry import AnalysisInputs


def test_rows_of_reads_the_selected_rows_of_the_base() -> None:
    base = np.arange(10 * 4, dtype=np.float16).reshape(10, 2, 2)
    rows = np.array([7, 2, 9, 0])
    sel = np.array([True, False, True, True])
    got = RowsOf(base, rows)[sel]
    assert got.dtype == np.float32 and np.array_equal(got, base[rows][sel].astype(np.float32))
    cells = np.ones((2, 2), dtype=bool)
    assert object_overlap(RowsOf(base, rows), sel, cells) == object_overlap(base[rows], sel, cells)


def test_grids_by_chunk_equal_the_grids_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((11, 7, 7)).astype(np.float16)
    maps[4] = 0  # no mass: NaN on the grid
    table = pd.DataFrame({"row": np.arange(11)[::-1], "method": "grad_cam", "id": [f"s{i}" for i in range(11)]})
    run = SimpleNamespace(load_maps=lambda m, t: maps, load_objects=lambda: None)
    monkeypatch.setattr(registry, "CHUNK", 3)
    inputs = AnalysisInputs(table, "label", ["grad_cam"], ["a"], [], run, Thresholds())  # type: ignore[arg-type]
    _, grids = inputs.grids["grad_cam"]
    expected = grid_maps(maps[table["row"].to_numpy()])
    assert grids.dtype == np.float32 and np.array_equal(grids, expected, equal_nan=True)
    assert np.isnan(grids[6]).all()  # row 4, the seventh in the table's order


def test_chunked_sums_and_overlaps_equal_the_whole_array_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((10, 4, 4)).astype(np.float32)
    maps[3, 0, 0] = np.nan
    monkeypatch.setattr(hotspots, "CHUNK", 3)
    monkeypatch.setattr(grids_module, "CHUNK", 3)
    assert hotspots.finite_rows(maps).tolist() == [i != 3 for i in range(10)]
    assert hotspots.finite_rows(maps[:0]).tolist() == []  # a method with no rows
    rows = np.array([0, 2, 4, 5, 6, 9])
    assert np.allclose(hotspots.sum_rows(maps, rows), maps[rows].sum(0, dtype=np.float64))
    cells = np.zeros((4, 4), dtype=bool)
    cells[1:3, 1:3] = True
    sel = np.arange(10) % 2 == 0  # row 3 (no mask) is not selected; 4 of the 5 chunks of 3 are partial
    assert object_overlap(maps, sel, cells) == pytest.approx(float(maps[sel][:, cells].mean()))
    assert np.isnan(object_overlap(maps, np.array([3]), cells))  # the only row has no mask

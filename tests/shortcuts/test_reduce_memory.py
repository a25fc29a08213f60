"""The reduce stage's per-row arrays: the analysis grids put on the grid a chunk at a time, and the hotspots
reading a class's object grids when asked, give what the whole-array computation gives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from auditor.shortcuts import registry
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.grids import grid_maps, object_overlap
from auditor.shortcuts.hotspots import RowsOf
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
    monkeypatch.setattr(registry, "GRID_CHUNK", 3)
    inputs = AnalysisInputs(table, "label", ["grad_cam"], ["a"], [], run, Thresholds())  # type: ignore[arg-type]
    _, grids = inputs.grids["grad_cam"]
    expected = grid_maps(maps[table["row"].to_numpy()])
    assert grids.dtype == np.float32 and np.array_equal(grids, expected, equal_nan=True)
    assert np.isnan(grids[6]).all()  # row 4, the seventh in the table's order

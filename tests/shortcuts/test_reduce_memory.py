"""The reduce stage's per-row arrays: the analysis grids put on the grid a chunk at a time, and the hotspots
reading a class's object grids when asked, give what the whole-array computation gives."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditor.shortcuts import grids as grids_module
from auditor.shortcuts import hotspots, registry, subsets
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.grids import RowsOf, grid_maps, object_overlap
from auditor.shortcuts.registry import AnalysisInputs
from auditor.store.rows import DiskRows, write_rows
from auditor.store.rundir import RunDir, RunStore, map_key


def test_rows_of_reads_the_selected_rows_of_the_base() -> None:
    base = np.arange(10 * 4, dtype=np.float16).reshape(10, 2, 2)
    rows = np.array([7, 2, 9, 0])
    sel = np.array([True, False, True, True])
    got = RowsOf(base, rows)[sel]
    assert got.dtype == np.float32 and np.array_equal(got, base[rows][sel].astype(np.float32))
    cells = np.ones((2, 2), dtype=bool)
    assert object_overlap(RowsOf(base, rows), sel, cells) == object_overlap(base[rows], sel, cells)


def test_grids_by_chunk_equal_the_grids_in_one_go(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((11, 7, 7)).astype(np.float16)
    maps[4] = 0  # no mass: NaN on the grid
    store = RunStore(tmp_path, 11)
    store.maps(map_key("grad_cam", "label"), (7, 7))[:] = maps
    store.flush()
    table = pd.DataFrame({"row": np.arange(11)[::-1], "method": "grad_cam", "id": [f"s{i}" for i in range(11)]})
    monkeypatch.setattr(registry, "CHUNK", 3)
    inputs = AnalysisInputs(table, "label", ["grad_cam"], ["a"], [], RunDir(tmp_path), Thresholds())
    _, grids = inputs.grids["grad_cam"]
    expected = grid_maps(maps[table["row"].to_numpy()])
    assert isinstance(grids, DiskRows) and grids.shape == (11, 32, 32)
    assert grids.dtype == np.float32 and np.array_equal(grids[:], expected, equal_nan=True)
    assert np.isnan(grids[6]).all()  # row 4, the seventh in the table's order
    scratch = grids.path.parent
    assert scratch.parent == tmp_path and scratch.name.startswith(".analysis-")
    del inputs, grids
    gc.collect()
    assert not scratch.exists()  # the grid files go with the inputs that made them


def test_disk_rows_read_any_selection_and_let_the_file_go(tmp_path: Path) -> None:
    values = np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2)
    rows = write_rows(tmp_path / "x.npy", 6, (2, 2), "float32", [values[:4], values[4:]])
    assert rows.shape == (6, 2, 2) and len(rows) == 6 and rows.dtype == np.float32
    cells = np.array([[True, False], [False, True]])
    for selection in (3, slice(1, 4), np.array([5, 0, 5]), np.arange(6) % 2 == 0, (slice(None), cells)):
        got = rows[selection]
        assert not isinstance(got, np.memmap) and np.array_equal(got, values[selection])
    assert np.array_equal(np.asarray(rows), values)
    mapped = Path("/proc/self/maps")
    if mapped.exists():  # Linux: no map of the file is left once a read returns
        assert str(tmp_path / "x.npy") not in mapped.read_text()
    with pytest.raises(ValueError, match="5 rows were written, expected 6"):
        write_rows(tmp_path / "y.npy", 6, (2, 2), "float32", [values[:5]])
    with pytest.raises(ValueError, match=r"rows of shape \(4,\), expected \(2, 2\)"):
        write_rows(tmp_path / "y.npy", 6, (2, 2), "float32", [values.reshape(6, 4)])


def test_every_pass_over_the_maps_reads_them_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hotspots, subset and cluster measurements read the grid file through ``by_chunk``: none asks the
    file for every map at once (which would map it whole: 4 GB at a million rows)."""
    rng = np.random.default_rng(2)
    maps = rng.random((40, 32, 32)).astype(np.float32)
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    maps[:20, 2:6, 2:6] += 0.05  # class a hot at the top-left
    asked: list[int] = []

    class Counting:
        shape = maps.shape

        def __len__(self) -> int:
            return len(maps)

        def __getitem__(self, selection: object) -> np.ndarray:
            got = maps[selection]  # type: ignore[index]
            asked.append(len(got) if got.ndim == 3 else 1)
            return got

    monkeypatch.setattr(grids_module, "CHUNK", 8)
    labels = np.array(["a"] * 20 + ["b"] * 20)
    found = hotspots.class_hotspots(Counting(), labels, ["a", "b"])
    whole = hotspots.class_hotspots(maps, labels, ["a", "b"])
    assert "a" in found and json.dumps(found, sort_keys=True) == json.dumps(whole, sort_keys=True)  # NaN alike
    assert max(asked) <= 8
    asked.clear()
    assert np.array_equal(grids_module.by_chunk(Counting(), subsets.peaks), subsets.peaks(maps))
    assert max(asked) <= 8


def test_chunked_sums_and_overlaps_equal_the_whole_array_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((10, 4, 4)).astype(np.float32)
    maps[3, 0, 0] = np.nan
    monkeypatch.setattr(grids_module, "CHUNK", 3)
    assert grids_module.finite_rows(maps).tolist() == [i != 3 for i in range(10)]
    assert grids_module.finite_rows(maps[:0]).tolist() == []  # a method with no rows
    rows = np.array([0, 2, 4, 5, 6, 9])
    assert np.allclose(grids_module.sum_rows(maps, rows), maps[rows].sum(0, dtype=np.float64))
    cells = np.zeros((4, 4), dtype=bool)
    cells[1:3, 1:3] = True
    sel = np.arange(10) % 2 == 0  # row 3 (no mask) is not selected; 4 of the 5 chunks of 3 are partial
    assert object_overlap(maps, sel, cells) == pytest.approx(float(maps[sel][:, cells].mean()))
    assert np.isnan(object_overlap(maps, np.array([3]), cells))  # the only row has no mask

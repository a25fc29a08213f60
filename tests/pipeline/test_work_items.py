"""The analyses' work items (``run.work``): each item's result is kept in the run directory as it finishes and
read back, not run again, while the analysis, its measurement, the thresholds, the seed and the population
are the same; the results are the same whether an item ran now or was read back; a run stopped during the
analyses resumes from its items and ends with the same summary."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import main
from auditor.run.work import decode, encode, run_here, stored
from auditor.shortcuts import cues
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.registry import Analysis, AnalysisInputs, Measurement
from auditor.store.rundir import RunDir
from tests.pipeline.conftest import make_config
from tests.pipeline.test_golden import _round, assert_close
from tests.shortcuts.test_triage import Recorder, _inputs, _table


class Counting:
    """A runner that runs items here and records which classes it was asked for."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(
        self, analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
    ) -> Iterator[tuple[str, str, int]]:
        self.asked.append(list(keys))
        yield from run_here(analysis, measured, inputs, keys)


def test_encoding_keeps_nan_and_turns_numpy_into_python_values() -> None:
    value = {"a": np.float32(0.5), "b": np.array([1, 2]), "c": float("nan"), "d": (1, "x"), "e": None}
    back = decode(encode(value))
    assert back["a"] == 0.5 and back["b"] == [1, 2] and np.isnan(back["c"]) and back["d"] == [1, "x"]
    with pytest.raises(TypeError, match="not JSON"):
        encode({"x": object()})


def test_items_are_kept_and_read_back_until_what_they_depend_on_changes(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path)
    inputs = _inputs(_table(0.9, 0.9), Recorder(drop=0.5, removal=0.3), triage=False)
    runner = Counting()
    execute = stored(rundir, runner)
    first, _ = execute(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])
    assert runner.asked == [["a", "b"]] and len(list((tmp_path / "items" / "cues").glob("*.json"))) == 2
    again, _ = execute(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])
    assert runner.asked == [["a", "b"]] and again == first  # both read back
    (rundir.item_path("cues", "b")).write_text("{truncated")  # a broken file is run again, not trusted
    execute(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])
    assert runner.asked[-1] == ["b"]
    # another threshold, another measurement or another population: every item runs again
    other = _inputs(_table(0.9, 0.9), Recorder(drop=0.5, removal=0.3), triage=False)
    other.thresholds = Thresholds(triage=False, cue_drop=0.2)
    execute(cues.ANALYSIS, {"cues": {}}, other, ["a", "b"])
    assert runner.asked[-1] == ["a", "b"]
    execute(cues.ANALYSIS, {"cues": {"x": 1}}, inputs, ["a", "b"])
    assert runner.asked[-1] == ["a", "b"]
    moved = _inputs(_table(0.9, 0.8), Recorder(drop=0.5, removal=0.3), triage=False)
    execute(cues.ANALYSIS, {"cues": {}}, moved, ["a", "b"])
    assert runner.asked[-1] == ["a", "b"]


def test_a_stored_result_equals_the_one_run_in_this_process(tmp_path: Path) -> None:
    inputs = _inputs(_table(0.9, 0.9), Recorder(drop=0.5, removal=0.3), triage=False)
    fresh, n_fresh = stored(RunDir(tmp_path / "a"))(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])
    here = {k: decode(text) for k, text, _ in run_here(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])}
    assert fresh == here and fresh["a"]["cue"]["region"] is not None  # a located, tested region
    read, n_read = stored(RunDir(tmp_path / "a"))(cues.ANALYSIS, {"cues": {}}, inputs, ["a", "b"])
    assert read == fresh and n_read == n_fresh


def test_a_run_stopped_during_the_analyses_resumes_from_its_items(
    dataset_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    before = json.loads((out / "summary.json").read_text())
    items = sorted((out / "items").rglob("*.json"))
    assert items, "the audit ran no work item: the test would not test resuming"
    for name in ("summary.json", "flags.json", "report.html"):  # as if stopped during the analyses ...
        (out / name).unlink()
    for path in items[1::2]:  # ... with half the items done
        path.unlink()
    with caplog.at_level(logging.INFO, logger="auditor.analyses"):
        assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "work items read back" in caplog.text
    after = json.loads((out / "summary.json").read_text())
    a, b = before["analyses"], after["analyses"]
    for key in ("cues", "frames", "global", "interventions", "subset_cues", "triage", "forwards", "tests"):
        assert b[key] == a[key], key  # exactly: the items read back, the forwards counted include theirs
    assert_close(_round(b), _round(a), "analyses")  # the rest (the concepts' NMF differs in its 12th digit)

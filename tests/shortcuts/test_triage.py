"""The triage (``shortcuts.triage``): which classes the region scan, border test and colour shifts examine in
full. Oracles on hand-made tables and a recording stand-in for the model; the recall on planted scenarios."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from auditor.shortcuts import backdrop, cues, frame, properties
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.registry import AnalysisInputs, intervene_here
from auditor.shortcuts.triage import (
    class_ceilings,
    label_ceiling,
    not_recognized,
    out_of_reach,
    probe_reason,
    too_few_called,
)


def _table(p_a: float, p_b: float, n: int = 12) -> pd.DataFrame:
    """``n`` images of classes a and b, every one called right, with p(label) ``p_a`` / ``p_b``."""
    rows = [
        {"row": i, "id": f"{c}{k}", "label": c, "pred": c, "correct": True, "prob": p, "target_prob": p}
        | {"bg_red": 0.1 * (c == "a"), "bg_green": 0.2, "bg_blue": 0.3}
        for i, (c, k, p) in enumerate([(c, k, p) for c, p in (("a", p_a), ("b", p_b)) for k in range(n)])
    ]
    return pd.DataFrame(rows)


class Recorder:
    """The model access of the analyses, answering with fixed numbers and recording each call's images."""

    def __init__(self, drop: float = 0.0, removal: float = 0.0, shift: float = 0.0) -> None:
        self.drop, self.removal, self.shift = drop, removal, shift
        self.calls: list[tuple[str, list[int]]] = []

    def scan(self, rows: Sequence[int], cls: int, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        self.calls.append(("scan", list(rows)))
        out = np.zeros((len(rows), len(boxes)))
        out[:, 0] = self.drop  # the top-left window: a place that drops in every image
        return out

    def region_test(self, own: Sequence[int], other: Sequence[int], *args: Any) -> dict[str, Any]:
        self.calls.append(("region", list(own) + list(other)))
        stats = {"removal_drop": self.removal, "paste_gain": 0.0, "paste_flips": 0.0}
        return stats | {
            "n_removed": len(own),
            "n_pasted": len(other),
            "control": {"region": [0, 0, 1, 1], "removal_drop": 0.0, "paste_gain": 0.0, "paste_flips": 0.0},
            "removal_effect": self.removal,
            "removal_p": 1.0,
            "paste_effect": 0.0,
            "paste_p": 1.0,
        }

    def graft_test(self, own: Sequence[int], other: Sequence[int], *args: Any) -> dict[str, Any]:
        self.calls.append(("graft", list(own) + list(other)))
        nothing = {"paste_effect": 0.0, "paste_flips": 0.0, "null_flips": 0.0, "paste_p": 1.0, "removal_effect": 0.0}
        return nothing | {"n_pasted": len(other), "removal_flips": 0.0, "removal_null_flips": 0.0, "removal_p": 1.0}

    def shift_test(self, own: Sequence[int], other: Sequence[int], *args: Any, outside: bool = True) -> dict[str, Any]:
        self.calls.append(("shift", list(own) + list(other)))
        self.outside = outside
        whole = {"n_own": len(own), "n_other": len(other), "leave": self.shift, "flip": self.shift, "kept": 0.0}
        whole |= {"leave_control": 0.0, "flip_control": 0.0, "leave_p": 1.0, "flip_p": 1.0}
        return {"whole": whole, "outside": None}

    forwards = 0
    has_activations = False


def _inputs(table: pd.DataFrame, recorder: Recorder, triage: bool = True) -> AnalysisInputs:
    run = SimpleNamespace(map_rows=lambda m, t: None, object_rows=lambda: None)
    t = Thresholds(triage=triage)
    return AnalysisInputs(table, "label", [], ["a", "b"], [], run, t, intervener=recorder)  # type: ignore[arg-type]


def test_the_ceiling_of_p_label_is_exact_for_labels_and_a_bound_for_predictions() -> None:
    first = pd.DataFrame(
        {"label": ["a", "a", "b"], "prob": [0.9, 0.7, 0.4], "correct": [True, False, False]}
        | {"target_prob": [0.9, 0.2, 0.1]}
    )
    assert label_ceiling(first, "label").tolist() == [0.9, 0.2, 0.1]  # p(label) itself
    # explaining predictions: right -> the top probability; wrong -> another class holds the top one
    assert label_ceiling(first, "pred").tolist() == pytest.approx([0.9, 0.3, 0.4])


def test_a_class_is_out_of_reach_only_when_every_image_is_below_the_least_effect() -> None:
    first = _table(0.1, 0.1)
    first.loc[first["id"] == "b3", "target_prob"] = 0.2  # one image of b reaches 0.15
    ceilings = class_ceilings(first, "label")
    assert ceilings == {"a": 0.1, "b": 0.2}
    reason = out_of_reach(ceilings, "a", 0.15)
    assert reason is not None and "no a image has p(a) of 0.15 or more (highest 0.100)" in reason
    assert out_of_reach(ceilings, "b", 0.15) is None
    assert out_of_reach(ceilings, "c", 0.15) is None  # no image: nothing to say
    first.loc[first["label"] == "a", "pred"] = ["a"] * 4 + ["b"] * 8
    assert too_few_called(first, "a", 5) == "the model calls 4 of the 12 a images a; a test needs 5"
    assert too_few_called(first, "b", 5) is None


def test_a_probe_passes_at_half_the_least_effect_and_when_it_cannot_tell() -> None:
    assert probe_reason("x", 0.026, 0.05, 8) is None
    assert probe_reason("x", float("nan"), 0.05, 8) is None  # nothing told: the full test runs
    assert probe_reason("x", 0.024, 0.05, 8) == (
        "probe on 8 images: x 0.024, under half of the 0.05 a flag needs; the full test did not run"
    )


def test_the_scan_skips_a_class_out_of_reach_and_stops_at_a_flat_probe() -> None:
    """Class a: no image reaches p 0.15, so nothing is scanned. Class b: its probe (4 images) drops nowhere,
    so only those 4 are scanned. Triage off: both classes' scans run in full (6 of their 12 images; the other 6
    are held out for the confirmation)."""
    rec = Recorder(drop=0.0)
    out = intervene_here(cues.WORK, {"cues": {}}, _inputs(_table(0.1, 0.9), rec))
    assert set(out["triage"]) == {"a", "b"} and out["cues"] == {}
    assert "no a image has p(a) of 0.15" in out["triage"]["a"]
    assert "probe on 4 images: the largest mean drop of p at a window" in out["triage"]["b"]
    assert [(k, len(r)) for k, r in rec.calls] == [("scan", 4)]
    rec = Recorder(drop=0.0)
    off = intervene_here(cues.WORK, {"cues": {}}, _inputs(_table(0.1, 0.9), rec, triage=False))
    assert off["triage"] == {} and set(off["cues"]) == {"a", "b"}
    assert [(k, len(r)) for k, r in rec.calls] == [("scan", 6), ("scan", 6)]


def test_a_probe_that_drops_goes_on_to_the_rest_of_the_same_images() -> None:
    """A drop of 0.5 at one window in every image: the probe passes, the other 8 of the same keyed draw are
    scanned and the scan's measurement is the one a scan in one go gives."""
    rec = Recorder(drop=0.5)
    out = cues._coarse_drops(_inputs(_table(0.9, 0.9), rec), list(range(12)), 0, [[0, 0, 0.25, 0.25]] * 3, "a", {})
    assert [r for _, r in rec.calls] == [[0, 1, 2, 3], list(range(4, 12))]
    assert out is not None and out.shape == (12, 3) and (out[:, 0] == 0.5).all()


def test_the_border_and_shift_probes_decide_from_a_few_images() -> None:
    table = _table(0.9, 0.9)
    rec = Recorder(removal=0.02, shift=0.1)  # under half of 0.05 and of 0.25
    inputs = _inputs(table, rec)
    out = intervene_here(frame.WORK, {"frames": {}}, inputs)
    assert out["frames"] == {} and set(out["triage"]) == {"a", "b"}
    assert [(k, len(r)) for k, r in rec.calls] == [("region", 8), ("region", 8)]
    rec.calls.clear()
    measured = properties.measure(inputs)
    out = intervene_here(properties.WORK, measured, inputs)
    assert set(out["triage"]) == {"a", "b"} and all("test" not in r for r in out["global"].values())
    assert [(k, len(r)) for k, r in rec.calls] == [("shift", 16), ("shift", 16)]  # 8 of the class, 8 others
    rec = Recorder(removal=0.03, shift=0.13)  # over half: the full tests run (12 of the class, 12 others)
    inputs = _inputs(table, rec)
    assert intervene_here(frame.WORK, {"frames": {}}, inputs)["triage"] == {}
    assert [(k, len(r)) for k, r in rec.calls] == [("region", 8), ("region", 24)] * 2
    rec.calls.clear()
    assert intervene_here(properties.WORK, properties.measure(inputs), inputs)["triage"] == {}
    assert [(k, len(r)) for k, r in rec.calls] == [("shift", 16), ("shift", 24)] * 2


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "masks"), [("stamp", False), ("marker", True), ("colour", False), ("control", True)])
def test_the_triage_loses_no_flag_on_planted_scenarios(tmp_path: Path, kind: str, masks: bool) -> None:
    """Recall: the flags of an audit with the triage are those of the full analyses (the same ids and
    severities), on a corner stamp without masks, a marker along a random edge, a brightness cue without
    metadata, and a clean model; and the triage saved forwards where it left classes out."""
    from tests.shortcuts.test_planted import _audit

    rate = (0.0, 0.0) if kind == "control" else (1.0, 0.0) if kind != "colour" else (0.7, 0.3)
    on = _audit(kind, tmp_path / "on", masks=masks, cue_rate=rate)
    off = _audit(kind, tmp_path / "off", masks=masks, cue_rate=rate, overrides={"thresholds": {"triage": False}})
    assert [(f["id"], f["severity"]) for f in on] == [(f["id"], f["severity"]) for f in off]
    summaries = [json.loads((tmp_path / w / "run" / "summary.json").read_text())["analyses"] for w in ("on", "off")]
    assert summaries[1]["triage"] == {}
    saved = {a for a, r in summaries[0]["triage"].items() if r}
    for a in saved:
        assert summaries[0]["forwards"][a] < summaries[1]["forwards"][a], a
    html = (tmp_path / "on" / "run" / "report.html").read_text()
    assert ('id="triage"' in html) == bool(saved)  # the report lists the classes left out


def test_the_graft_skips_a_class_the_model_does_not_recognise_and_says_what_it_assumes() -> None:
    """Class a: no image reaches p(a) 0.5 (high_effect), so its backgrounds are not grafted; class b (0.9) is.
    One image at 0.5 is enough to graft; with the triage off both classes are grafted."""
    first = _table(0.3, 0.9)
    assert not_recognized(class_ceilings(first, "label"), "b", 0.5) is None
    rec = Recorder()
    out = intervene_here(backdrop.WORK, {"backdrops": {}}, _inputs(first, rec))
    assert set(out["backdrops"]) == {"b"} and set(out["triage"]) == {"a"}
    assert "no a image has p(a) of 0.50 or more (highest 0.300)" in out["triage"]["a"]
    assert "assumed unable to raise p(a) by the 0.50 a flag needs on other images" in out["triage"]["a"]
    assert [k for k, _ in rec.calls] == ["graft"]
    first.loc[first["id"] == "a3", "target_prob"] = 0.5
    assert intervene_here(backdrop.WORK, {"backdrops": {}}, _inputs(first, Recorder()))["triage"] == {}
    rec = Recorder()
    off = intervene_here(backdrop.WORK, {"backdrops": {}}, _inputs(_table(0.3, 0.9), rec, triage=False))
    assert off["triage"] == {} and set(off["backdrops"]) == {"a", "b"} and len(rec.calls) == 2

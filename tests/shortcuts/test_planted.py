"""End to end: a model trained to rely on a planted cue is flagged with the right kind and class; a model
trained without a cue gets no high-severity flag.

Each scenario trains a small CNN on 160 scenes where only the cue tells the classes apart, checks that the
model relies on it (flipping the cue flips the predictions), writes a fresh audit set to disk and runs
``auditor run`` on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from auditor import load_config, run_audit
from tests.shortcuts.planted import MEAN, STD, accuracy, make, train, write

TINYNET = Path(__file__).parents[1] / "pipeline" / "tinynet.py"
PROPERTIES = {"brightness", "contrast", "red", "green", "blue", "sharpness"}


def _audit(
    kind: str,
    tmp: Path,
    *,
    masks: bool,
    cue_rate: tuple[float, float],
    sanity: bool = False,
    overrides: dict[str, Any] | None = None,
    area: float | None = None,
) -> list[dict]:
    model = train(make(kind, 80, 0, area=area))
    if kind != "control":  # the model must rely on the cue: moving the cue to the other class flips it
        assert accuracy(model, make(kind, 30, 5, area=area)) > 0.95
        assert accuracy(model, make(kind, 30, 6, cue_rate=(0.0, 1.0), area=area)) < 0.2
    else:
        assert accuracy(model, make(kind, 30, 5, area=area)) > 0.95
    write(tmp, make(kind, 40, 1, cue_rate=cue_rate, area=area), masks=masks)
    torch.save(model.state_dict(), tmp / "model.pt")
    cfg: dict[str, Any] = {
        "model": {"factory": f"{TINYNET}:build", "factory_kwargs": {"width": 12}, "checkpoint": str(tmp / "model.pt")},
        "data": {
            "manifest": str(tmp / "audit.csv"),
            "image_size": 32,
            "normalize": {"mean": [MEAN] * 3, "std": [STD] * 3},
        },
        "methods": ["grad_cam", "hires_cam", "layer_cam"],
        "metrics": ["energy_in_mask", "energy_outside_mask", "pointing_game"],
        "batch_size": 32,
    }
    if sanity:
        cfg["sanity"] = {"methods": ["grad_cam", "hires_cam"], "n_images": 8, "n_blocks": 1}
    cfg.update(overrides or {})
    (tmp / "audit.yaml").write_text(yaml.safe_dump(cfg))
    run_audit(load_config(tmp / "audit.yaml"), tmp / "run", progress=False)
    flags: list[dict] = json.loads((tmp / "run" / "flags.json").read_text())["flags"]
    for f in flags:
        assert set(f) == {
            "id",
            "kind",
            "class",
            "attribute",
            "region",
            "severity",
            "score",
            "methods",
            "message",
            "evidence",
        }
        assert 0 <= f["score"] <= 1 and f["severity"] in ("low", "medium", "high") and f["message"]
    return flags


def _high(flags: list[dict]) -> set[tuple[str, str | None]]:
    return {(f["kind"], f["class"]) for f in flags if f["severity"] == "high"}


def test_global_brightness_cue_without_metadata(tmp_path: Path) -> None:
    flags = _audit("colour", tmp_path, masks=False, cue_rate=(0.7, 0.3))
    leaks = [f for f in flags if f["kind"] == "attribute_leak" and f["severity"] == "high"]
    assert leaks and all(f["attribute"] in PROPERTIES for f in leaks)
    assert {f["class"] for f in leaks} == {"a", "b"}


def test_corner_stamp_is_a_confirmed_hotspot(tmp_path: Path) -> None:
    flags = _audit("stamp", tmp_path, masks=False, cue_rate=(1.0, 0.0), sanity=True)
    hot = [f for f in flags if f["kind"] == "spatial_hotspot" and f["class"] == "a"]
    assert hot and hot[0]["severity"] == "high" and hot[0]["evidence"]["confirmed"]
    _, _, x1, y1 = hot[0]["region"]
    assert x1 <= 0.4 and y1 <= 0.4  # the top-left corner, where the tag is
    assert "top-left corner" in hot[0]["message"]


def test_background_texture_cue(tmp_path: Path) -> None:
    flags = _audit("texture", tmp_path, masks=True, cue_rate=(1.0, 0.0))
    high = _high(flags)
    assert ("counterfactual_background", "a") in high and ("background_reliance", "a") in high


def test_marker_at_a_random_edge(tmp_path: Path) -> None:
    flags = _audit("marker", tmp_path, masks=True, cue_rate=(1.0, 0.0))
    high = _high(flags)
    assert ("background_reliance", "a") in high or ("counterfactual_background", "a") in high


def test_clean_control_gets_no_high_severity_flag(tmp_path: Path) -> None:
    flags = _audit("control", tmp_path, masks=True, cue_rate=(0.0, 0.0), sanity=True)
    assert _high(flags) == set(), [f["message"] for f in flags]
    print("control flags:", [(f["kind"], f["class"], f["severity"]) for f in flags])


@pytest.mark.slow
@pytest.mark.parametrize("area", [0.4, 0.7])
def test_large_objects_do_not_switch_the_background_detectors_off(tmp_path: Path, area: float) -> None:
    """Objects covering 40% and 70% of the frame: every margin removal takes nearly the whole image, so the
    counterfactual is not measured there. It once decided anyway (nothing left: "the class goes with the
    object") and vetoed background_reliance, so a background-texture cue went unflagged *because* masks
    were given. The clean model (the object's colour tells the classes apart) stays clean either way."""
    cue = _audit("texture", tmp_path / "cue", masks=True, cue_rate=(1.0, 0.0), area=area)
    background = {f["class"] for f in cue if f["kind"] == "background_reliance" and f["severity"] != "low"}
    assert background == {"a", "b"}, [f["message"] for f in cue]  # grass carries a, brick carries b
    summary = json.loads((tmp_path / "cue" / "run" / "summary.json").read_text())
    assert not any(r["measurable"] for r in summary["analyses"]["counterfactual"].values())
    for masks in (True, False):
        clean = _audit("control", tmp_path / f"clean-{masks}", masks=masks, cue_rate=(0.0, 0.0), area=area)
        assert [f for f in clean if f["severity"] != "low"] == [], [f["message"] for f in clean]


@pytest.mark.slow
def test_a_background_texture_is_found_without_masks_by_grafting_it(tmp_path: Path) -> None:
    """No region to scan, no colour to shift: grass behind other classes' objects makes them a, and b's images
    lose b on a's grass (the reverse, which names the class whose background the model reads; in two classes the
    same images)."""
    flags = _audit("texture", tmp_path, masks=False, cue_rate=(1.0, 0.0))
    graft = {f["class"]: f for f in flags if f["kind"] == "backdrop_cue" and f["severity"] == "high"}
    assert sorted(graft) == ["a", "b"], [f["message"] for f in flags]
    assert [graft[c]["evidence"]["direction"] for c in "ab"] == ["paste", "removal"]
    test = graft["a"]["evidence"]["test"]
    assert test["paste_flips"] - test["null_flips"] > 0.5 and test["own_compact"] < 0.75
    test = graft["b"]["evidence"]["test"]
    assert test["removal_flips"] - test["removal_null_flips"] > 0.5 and test["other_compact"] < 0.75
    assert "lose" in graft["b"]["message"] and "other images (before that" in graft["b"]["message"]


@pytest.mark.slow
def test_flags_do_not_depend_on_the_faithfulness_defaults(tmp_path: Path) -> None:
    """The default set computes faithfulness on the expensive subset, for grad_cam, at step 0.02; the old
    defaults (every sample, every method, step 0.01) give the same flags: flags stand on localization,
    analyses and interventions, not on faithfulness numbers."""
    for kind, masks in (("texture", True), ("control", True)):
        now = _audit(kind, tmp_path / kind / "now", masks=masks, cue_rate=(1.0, 0.0), overrides={"metrics": "fast"})
        before = {
            "metrics": "fast",
            "expensive": {"per_class": 1000, "faithfulness": "all"},  # every sample, every method
            "metric_options": {"deletion_auc": {"step": 0.01}, "insertion_auc": {"step": 0.01}},
        }
        old = _audit(kind, tmp_path / kind / "old", masks=masks, cue_rate=(1.0, 0.0), overrides=before)
        key = [(f["id"], f["severity"]) for f in now]
        assert key == [(f["id"], f["severity"]) for f in old], kind

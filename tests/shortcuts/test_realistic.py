"""The realistic case: the audit split carries the training bias, so accuracy gives nothing away.

Six classes at 64 px; class ``tagged`` is recognisable only by a small orange tag near the bottom-left
corner (its objects are the other classes' objects); in a second model it is recognisable only by a colour cast
over the whole image. The models' last layer gives 4 x 4 maps. In every
mask condition (exact, eroded, dilated, boxes, none) the tag must be flagged high on its class, localized
to its place, and grouped into one finding. A clean model of the same data (class ``tagged`` has its own
object, no tag) must get no high or medium flag, and at most a few low ones, under imperfect masks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from auditor import load_config, run_audit
from tests.shortcuts import realistic as R

TINYNET = Path(__file__).parents[1] / "pipeline" / "tinynet.py"
SIZE = R.SIZE
# each module trains its models once (about a minute) and audits them a dozen times
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both models, trained once: each must score >= 95% on an i.i.d. split; the cue model must need the tag."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("cue", "tint", "clean"):
        model = R.train(R.make(kind, 150, 0))
        held_out = R.make(kind, 30, 7)
        assert R.accuracy(model, held_out) >= 0.95
        untagged = R.accuracy(model, R.untagged(held_out), R.CUE_CLASS)
        if kind != "tint":
            assert untagged < 0.1 if kind == "cue" else untagged > 0.9
        torch.save(model.state_dict(), root / f"{kind}.pt")
        out[kind] = root / f"{kind}.pt"
    return out


def _audit(tmp: Path, checkpoint: Path, kind: str, masks: str, px: int = 2) -> tuple[list[dict], dict, dict]:
    R.write(tmp, R.make(kind, 20, 1), masks, px)
    cfg: dict[str, Any] = {
        "model": {"factory": f"{TINYNET}:build_deep", "factory_kwargs": {"blocks": 5}, "checkpoint": str(checkpoint)},
        "data": {
            "manifest": str(tmp / "audit.csv"),
            "image_size": SIZE,
            "classes": list(R.CLASSES),
            "normalize": {"mean": [R.MEAN] * 3, "std": [R.STD] * 3},
        },
        "metrics": R.AUDIT_METRICS,
    }
    (tmp / "audit.yaml").write_text(yaml.safe_dump(cfg))
    run_audit(load_config(tmp / "audit.yaml"), tmp / "run", progress=False)
    flags_file = json.loads((tmp / "run" / "flags.json").read_text())
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    return flags_file["flags"], flags_file["findings"], summary


@pytest.mark.parametrize("masks", ["exact", "eroded", "dilated", "boxes", "none"])
def test_the_tag_is_flagged_localized_and_grouped(models: dict[str, Path], tmp_path: Path, masks: str) -> None:
    flags, findings, summary = _audit(tmp_path, models["cue"], "cue", masks)
    assert summary["accuracy"]["*"]["accuracy"] >= 0.95  # accuracy gives nothing away
    cue_flags = [f for f in flags if f["class"] == R.CUE_CLASS]
    assert any(f["severity"] == "high" for f in cue_flags), [(f["id"], f["severity"]) for f in flags]
    located = [f for f in cue_flags if f["kind"] == "region_cue"]
    assert located and R.inside_tag(located[0]["region"]), located
    mine = [g for g in findings if R.CUE_CLASS in g["classes"]]
    assert len(mine) == 1, [g["id"] for g in findings]
    finding = mine[0]
    assert finding["severity"] == "high" and finding["cause"] == "region"
    assert R.inside_tag(finding["region"]) and "bottom-left" in finding["sentence"]
    assert {f["id"] for f in cue_flags} <= set(finding["flags"])
    removed = [e for e in finding["examples"] if e["what"] == "region removed"]
    pasted = [e for e in finding["examples"] if e["what"] == "region pasted"]
    assert removed and all(e["p_after"] < e["p_before"] - 0.5 for e in removed)
    assert pasted and all(e["p_after"] > e["p_before"] + 0.5 for e in pasted)
    loc = summary["run"]["localization"]
    assert loc["grid"] == [4, 4] and loc["fine_layer"] == "features.14" and loc["method"] == "layer_cam"
    if masks != "none":
        assert any(f["kind"] == "counterfactual_background" and f["severity"] == "high" for f in cue_flags)


def test_a_global_colour_cue_moves_the_class_without_masks_or_metadata(models: dict[str, Path], tmp_path: Path) -> None:
    """The colour shifts measure the cast on every training of this model; the flag does not stand on all.

    On two trainings of the same data (this CPU's kernels, and oneDNN capped at AVX2) the whole-image shift
    moved the class by 1.0 / 0.90 and 1.0 / 0.74 (leave / flip, controls 0). Sparing the model's hot pixels
    (no masks: the pixels holding half its map mass, 23% of the image) it still moved 0.60 / 0.45 on the first
    and 0.75 / 0.19 on the second, under ``property_effect`` 0.25: flagged high on one, missed on the other
    (README, "Shortcut flags"). The test asserts the effect with a margin, and the flag's shape where it stands.
    """
    flags, findings, summary = _audit(tmp_path, models["tint"], "tint", "none")
    assert summary["accuracy"]["*"]["accuracy"] >= 0.95
    shifts, triaged = summary["analyses"]["global"], summary["analyses"]["triage"].get("properties", {})
    assert R.CUE_CLASS not in triaged  # the triage's probe passes the class the cast carries
    for cls, r in shifts.items():
        if cls in triaged:
            assert "test" not in r and "probe on 8 images" in triaged[cls], (cls, triaged[cls])
            continue
        whole = r["test"]["whole"]
        leave, flip = whole["leave"] - whole["leave_control"], whole["flip"] - whole["flip_control"]
        if cls == R.CUE_CLASS:
            assert r["property"] == "colour" and leave >= 0.5 and flip >= 0.5, r
        else:
            assert max(leave, flip) < 0.25, (cls, r)  # the other classes do not follow their colour
    cue = [f for f in flags if f["kind"] == "global_cue"]
    assert [(f["class"], f["attribute"]) for f in cue] in ([], [(R.CUE_CLASS, "colour")])
    assert not [f for f in flags if f["class"] != R.CUE_CLASS and f["severity"] != "low"]
    for g in findings:
        if g["cause"] == "property":
            assert g["classes"] == [R.CUE_CLASS]
            away = [e for e in g["examples"] if e["what"] == "colour shifted away"]
            assert away and all(e["p_after"] < 0.5 < e["p_before"] for e in away)


@pytest.mark.parametrize(
    ("masks", "px"), [("exact", 0), ("eroded", 1), ("eroded", 3), ("dilated", 3), ("boxes", 0), ("none", 0)]
)
def test_a_clean_model_stays_clean_under_imperfect_masks(
    models: dict[str, Path], tmp_path: Path, masks: str, px: int
) -> None:
    flags, findings, _ = _audit(tmp_path, models["clean"], "clean", masks, px)
    loud = [(f["id"], f["severity"], f["message"]) for f in flags if f["severity"] != "low"]
    assert not loud
    assert sum(f["severity"] == "low" for f in flags) <= 3
    assert all(g["severity"] == "low" for g in findings)

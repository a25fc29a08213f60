"""``frame_cue``: a cue along the image border, found by removing and transplanting the border band against
the ring just inside it.

The planted ``marker`` scenario puts a blue bar at a random place along a random edge of class a's images:
no one window of the region scan holds it, so without masks nothing found it before this analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auditor import load_config, run_audit
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.frame import band, band_cells, frame_flags, ring
from auditor.shortcuts.registry import FlagContext
from tests.shortcuts.planted import accuracy, make, train, write, write_config

T = Thresholds()


def _area(boxes: list[list[float]]) -> float:
    return sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)


def test_the_band_and_its_control_ring_have_the_same_area_and_do_not_overlap() -> None:
    for w in (0.05, 0.1, 0.14):
        assert _area(band(w)) == pytest.approx(1 - (1 - 2 * w) ** 2)
        assert _area(ring(w)) == pytest.approx(_area(band(w)))
        for b in band(w):
            for r in ring(w):
                assert min(b[2], r[2]) <= max(b[0], r[0]) + 1e-9 or min(b[3], r[3]) <= max(b[1], r[1]) + 1e-9
    cells = band_cells(0.1)
    assert cells[0].all() and cells[:, -1].all() and not cells[5:27, 5:27].any()


def _measured(removal: float, paste: float, p: float = 1e-4, overlap: float = float("nan")) -> dict[str, Any]:
    test = {
        "removal_drop": removal,
        "paste_gain": paste,
        "paste_flips": 0.5,
        "control": {"region": ring(0.1), "removal_drop": 0.0, "paste_gain": 0.0},
        "removal_effect": removal,
        "removal_p": p,
        "paste_effect": paste,
        "paste_p": p,
    }
    return {"frames": {"a": {"n": 32, "width": 0.1, "object_overlap": overlap, "test": test}}}


def _severity(m: dict[str, Any]) -> str | None:
    flags = frame_flags(m, FlagContext(T))
    return flags[0]["severity"] if flags else None


def test_the_frame_cue_rules() -> None:
    e = T.intervention_effect
    assert _severity(_measured(0.8, 0.8)) == "high"
    assert _severity(_measured(0.8, 0.0)) == "medium"  # removal without transplant
    assert _severity(_measured(0.0, 0.8)) is None  # transplant without removal: the border alone does not carry it
    assert _severity(_measured(e - 0.01, 0.8)) is None and _severity(_measured(e + 0.01, 0.0)) == "medium"
    assert _severity(_measured(0.8, 0.8, p=0.2)) is None  # an effect without significance
    assert _severity(_measured(0.8, 0.8, overlap=T.hotspot_object_overlap + 0.1)) is None  # the band is the object
    assert _severity(_measured(0.8, 0.8, overlap=0.1)) == "high"
    msg = frame_flags(_measured(0.8, 0.8), FlagContext(T))[0]["message"]
    assert "border" in msg and "ring just inside" in msg


def _audit(kind: str, tmp: Path, masks: bool) -> list[dict[str, Any]]:
    model = train(make(kind, 80, 0))
    assert accuracy(model, make(kind, 30, 5)) > 0.95
    write(tmp, make(kind, 40, 1, cue_rate=(1.0, 0.0) if kind == "marker" else (0.0, 0.0)), masks=masks)
    torch.save(model.state_dict(), tmp / "model.pt")
    write_config(tmp)
    run_audit(load_config(tmp / "audit.yaml"), tmp / "run", progress=False)
    return json.loads((tmp / "run" / "flags.json").read_text())["flags"]


@pytest.mark.slow
def test_a_marker_along_the_border_is_found_without_masks_and_a_clean_model_is_not_flagged(tmp_path: Path) -> None:
    flags = _audit("marker", tmp_path / "marker", masks=False)
    frame = [f for f in flags if f["kind"] == "frame_cue"]
    assert [(f["class"], f["severity"]) for f in frame] == [("a", "high")], [f["message"] for f in flags]
    ev = frame[0]["evidence"]["test"]
    assert ev["removal_effect"] > 0.3 and ev["paste_flips"] > 0.5
    for masks in (False, True):
        clean = _audit("control", tmp_path / f"clean-{masks}", masks=masks)
        assert not [f for f in clean if f["kind"] == "frame_cue"], [f["message"] for f in clean]
    # (without masks this clean model, whose objects differ by colour, gets global_cue: the README's known limit)
    assert np.isfinite(ev["removal_p"])

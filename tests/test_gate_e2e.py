"""End to end: a shortcut model gated against a clean baseline fails; the clean model against itself passes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from auditor.cli import main
from tests.shortcuts.planted import MEAN, STD, accuracy, make, train, write

TINYNET = Path(__file__).parent / "pipeline" / "tinynet.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gate")
    audit = make("both", 40, 1)  # object colour and background texture both tell the classes apart
    write(tmp / "data", audit, masks=True)
    out: dict[str, Path] = {}
    for name, kind in (("clean", "control"), ("shortcut", "texture")):
        model = train(make(kind, 80, 0))
        assert accuracy(model, audit) > 0.95  # both models are right on the audit set, for different reasons
        torch.save(model.state_dict(), tmp / f"{name}.pt")
        cfg = {
            "model": {
                "factory": f"{TINYNET}:build",
                "factory_kwargs": {"width": 12},
                "checkpoint": str(tmp / f"{name}.pt"),
            },
            "data": {
                "manifest": str(tmp / "data" / "audit.csv"),
                "image_size": 32,
                "normalize": {"mean": [MEAN] * 3, "std": [STD] * 3},
            },
            "methods": ["grad_cam", "hires_cam"],
            "metrics": ["energy_in_mask", "pointing_game"],
            "batch_size": 32,
        }
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        out[name] = tmp / f"run-{name}"
        assert main(["run", str(tmp / f"{name}.yaml"), "--out", str(out[name]), "--no-progress"]) == 0
    return out


def test_shortcut_model_fails_against_a_clean_baseline(runs: dict[str, Path], tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    code = main(["gate", str(runs["shortcut"]), "--baseline", str(runs["clean"]), "--junit", str(junit)])
    assert code == 1
    gate = json.loads((runs["shortcut"] / "gate.json").read_text())
    failed = {c["rule"] for c in gate["checks"] if c["status"] == "FAIL"}
    assert failed == {"no high-severity shortcut flag", "energy in mask does not drop"}
    assert 'failures="' in junit.read_text()


def test_clean_model_against_itself_passes(runs: dict[str, Path]) -> None:
    assert main(["gate", str(runs["clean"]), "--baseline", str(runs["clean"])]) == 0


def test_run_with_gate_in_one_command(runs: dict[str, Path], tmp_path: Path) -> None:
    cfg = runs["shortcut"].parent / "shortcut.yaml"
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--no-progress", "--gate", "configs/gates.yaml"]) == 1


def test_compare_page(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "diff.html"
    assert main(["compare", str(runs["clean"]), str(runs["shortcut"]), "--out", str(out)]) == 0
    html = out.read_text()
    assert "background_reliance/a/*" in html and "appeared" in html
    assert "energy_in_mask" in html and 'class="num worse"' in html
    assert html.count("data:image/png;base64,") >= 4
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing loaded from the network
    data = json.loads(out.with_suffix(".json").read_text())
    eim = next(
        r
        for b in data["deltas"]
        if b["method"] == "grad_cam"
        for r in b["rows"]
        if r["metric"] == "energy_in_mask" and r["cls"] == "*"
    )
    assert eim["ci_high"] < 0  # the shortcut model puts less of its attention on the object

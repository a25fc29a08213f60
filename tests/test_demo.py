"""`auditor demo`: the model that learned the weather is caught (a smaller demo, same code path)."""

from __future__ import annotations

import json
from pathlib import Path

from auditor.demo import run_demo


def test_demo_flags_the_weather(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "demo", n_train=120, n_audit=40, size=48)
    flags = json.loads((tmp_path / "demo" / "run" / "flags.json").read_text())["flags"]
    high = {(f["kind"], f["attribute"]) for f in flags if f["severity"] == "high"}
    assert ("attribute_leak", "weather") in high
    assert any(kind == "background_reliance" for kind, _ in high)
    assert summary["groups"]["weather"]["sunny"]["n"] > 0
    assert (tmp_path / "demo" / "run" / "report.html").stat().st_size < 15e6

"""report.html: rendered from saved results only, self-contained, escaped, within its size budget."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

from auditor.cli import main
from auditor.config import load_config
from auditor.run.local import run_audit
from tests.pipeline.conftest import make_config

HOSTILE = "<img src=x onerror=alert(1)>"


def test_report_is_self_contained_escaped_and_re_rendered(dataset_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset_dir, root)
    manifest = pd.read_csv(root / "audit.csv")
    manifest["label"] = manifest["label"].replace({"square": HOSTILE})
    manifest.to_csv(root / "audit.csv", index=False)
    cfg = load_config(
        make_config(
            root,
            tmp_path,
            methods=["grad_cam", "hires_cam"],
            metrics=["energy_in_mask", "pointing_game", "deletion_auc"],
            data={"classes": ["disc", HOSTILE]},
        )
    )
    run_audit(cfg, tmp_path / "run", progress=False)
    report = tmp_path / "run" / "report.html"
    html = report.read_text()
    assert 'id="verdict"' in html and "Findings" in html
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # autoescaped
    assert not re.search(r"(src|href)=[\"'](https?:)?//", html) and "fetch(" not in html
    assert "<script src" not in html.lower() and html.lower().count("<script") == 1  # one small inline script
    assert 'id="deep-dive"' in html and "guided backprop" in html and "feature maps of" in html
    assert report.stat().st_size < 15e6
    assert html.count("data:image/jpeg;base64,") >= 1
    before = report.read_text()
    report.unlink()
    assert main(["report", str(tmp_path / "run")]) == 0  # re-rendered from the saved files alone
    assert report.read_text() == before

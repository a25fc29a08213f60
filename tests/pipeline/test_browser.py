"""The report opened in headless Chromium: no console error, no network request, verdict and flags visible."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from auditor.config import load_config
from auditor.outputs.browser import check_report, chromium_path
from auditor.run.local import run_audit
from tests.pipeline.conftest import make_config

needs_browser = pytest.mark.skipif(
    chromium_path() is None and not os.environ.get("CI"),
    reason="no chromium here (CI installs it: apt-get install chromium)",
)


@needs_browser
def test_report_in_headless_chromium(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        make_config(
            dataset_dir,
            tmp_path,
            methods=["grad_cam", "hires_cam"],
            metrics=["energy_in_mask", "pointing_game", "deletion_auc"],
        )
    )
    run_audit(cfg, tmp_path / "run", progress=False)
    shot = tmp_path / "report.png"
    check = check_report(tmp_path / "run" / "report.html", shot)
    assert check.console_errors == []
    assert check.external_requests == []
    assert check.verdict == "Shortcut evidence found"  # this fixture's model learned the sky
    assert check.flags_shown >= 1
    assert shot.stat().st_size > 10_000
    assert check.deep_dive_views >= 3  # image, methods' maps, occlusion, guided backprop
    assert check.toggled  # clicking a gallery image switches to another view

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


@needs_browser
def test_a_45_class_report_lists_every_class_in_a_table_that_sorts_and_filters(tmp_path: Path) -> None:
    """An untrained 45-class model, 3 images a class: 40 class cards, a table row per class, sorting by a header
    (names A to Z, then Z to A) and filtering by name in the browser, with no console error."""
    import shutil

    import numpy as np
    import pandas as pd
    import torch
    import yaml
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from tests.pipeline.conftest import TINYNET
    from tests.pipeline.tinynet import build

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for c in range(45):
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{c}_{i}.png")
            rows.append({"path": f"img/{c}_{i}.png", "label": f"k{c:02d}"})
    pd.DataFrame(rows).to_csv(tmp_path / "audit.csv", index=False)
    torch.manual_seed(0)
    torch.save(build(45).state_dict(), tmp_path / "model.pt")
    cfg = {
        "model": {"factory": f"{TINYNET}:build", "factory_kwargs": {"num_classes": 45}, "checkpoint": "model.pt"},
        "data": {"manifest": "audit.csv", "image_size": 32},
        "methods": ["grad_cam"],
        "metrics": ["energy_in_mask"],
    }
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(cfg))
    run_audit(load_config(tmp_path / "audit.yaml"), tmp_path / "run", progress=False)
    report = tmp_path / "run" / "report.html"
    html = report.read_text()
    assert html.count('<div class="card"><h3>') == 40 and html.count("<tr data-class=") == 45
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path() or shutil.which("chromium"))
        page, errors = browser.new_page(), []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        first = "#class-table tbody tr"
        page.click("#class-table th:nth-child(1)")
        assert page.eval_on_selector(first, "r => r.dataset.class") == "k00"
        page.click("#class-table th:nth-child(1)")
        assert page.eval_on_selector(first, "r => r.dataset.class") == "k44"
        page.fill("#class-filter", "k1")
        shown = page.eval_on_selector_all(first, "rs => rs.filter(r => r.style.display !== 'none').length")
        browser.close()
    assert shown == 10 and errors == []  # k10 ... k19

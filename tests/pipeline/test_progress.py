"""Every long stage after the map stage says where it is, and the analyses' cost is counted, not estimated.

Oracles: the counting wrapper sees exactly the forwards the interventions' definitions imply (an occlusion
scan of n images and k boxes forwards n x (k + 1) images; a region test of n own and m other images forwards
3 x (n + m)); a run logs one line per analysis with its forwards, which add up to the model-access object's
count, and a start and end line for each stage after the map stage.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from auditor import load_config, run_audit
from auditor.ops import from_pixels, to_pixels
from auditor.run.access import Counted
from auditor.shortcuts.catalog import registered
from auditor.shortcuts.interventions import occlusion_scan, region_intervention
from auditor.shortcuts.registry import tracked
from tests.pipeline.conftest import make_config


def _model() -> Counted:
    torch.manual_seed(0)
    return Counted(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))


def test_the_counting_wrapper_sees_what_each_intervention_forwards() -> None:
    images = torch.rand(10, 3, 16, 16)
    model = _model().eval()
    occlusion_scan(model, images[:4], 1, [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 0.25]], chunk=3)
    assert model.images == 4 * (3 + 1)  # the plain images, then every box filled in every image

    # several boxes filled and forwarded together give the box-by-box drops
    boxes = [[i / 8, j / 8, i / 8 + 0.25, j / 8 + 0.25] for i in range(7) for j in range(7)]
    together = occlusion_scan(model, images, 2, boxes, chunk=64)
    assert np.abs(together - occlusion_scan(model, images, 2, boxes, chunk=1)).max() < 1e-6

    model.images = 0
    region_intervention(
        model, lambda rows: images[list(rows)], [0, 1, 2], [5, 6], 1, [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1],
        to_pixels=lambda x: to_pixels(x, None, None), from_pixels=lambda x: from_pixels(x, None, None),
    )  # fmt: skip
    assert model.images == 3 * (3 + 2)  # plain, region and control: removed from 3, pasted into 2

    model.images = 0
    out = region_intervention(
        model, lambda rows: images[list(rows)], [0, 1, 2], [], 1, [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1],
        to_pixels=lambda x: to_pixels(x, None, None), from_pixels=lambda x: from_pixels(x, None, None),
    )  # fmt: skip
    assert model.images == 3 * 3 and out["n_pasted"] == 0  # a run of one class: nothing to paste into
    assert out["paste_p"] == 1.0 and out["paste_effect"] != out["paste_effect"]  # NaN, not a made-up 0


def test_a_long_loop_logs_where_it_is(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="auditor.analyses")
    assert list(tracked(range(5), "scan, classes", every=0.0)) == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert [re.search(r"\d+/\d+", line).group(0) for line in lines] == ["1/5", "2/5", "3/5", "4/5"]  # type: ignore[union-attr]
    assert all(line.startswith("scan, classes: ") and "ETA" in line for line in lines)


def test_a_run_logs_every_stage_and_counts_each_analysis_forwards(
    dataset_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_config(
        dataset_dir,
        tmp_path,
        methods=["grad_cam"],
        expensive={"subset": "flagged", "per_class": 2},
        thresholds={"triage": False},  # every test in full: the dry run's bounds are checked against them
    )
    summary = run_audit(load_config(cfg), tmp_path / "run", progress=False)
    text = caplog.text
    for name in ("flagged pass", "analyses (2 classes)", "finding examples", "deep dive", "report"):
        assert re.search(rf"{re.escape(name)}.*: done in \d+\.\d s", text), name
    forwards = summary["analyses"]["forwards"]
    logged = {m.group(1): int(m.group(2)) for m in re.finditer(r"analysis (\w+): [\d.]+ s, (\d+) images", text)}
    ran = {a.name for a in registered()} - set(summary["analyses"]["skipped"])
    assert logged == forwards and set(forwards) == ran
    assert forwards["cues"] > 0 and forwards["properties"] > 0  # the scan and the colour shifts ran the model
    assert all(forwards[name] == 0 for name in ("background", "attributes"))  # read the table and maps only

    # the dry run's count of each analysis's forwards is the most the run took (here, every test in full)
    from auditor.run.estimate import analysis_bounds

    bounds = analysis_bounds(summary["dataset"]["per_class"], load_config(cfg).thresholds)
    assert all(forwards[a] <= bounds.get(a, 0) for a in forwards), (forwards, bounds)
    assert forwards["cues"] >= 0.5 * bounds["cues"]  # a bound, not a wild guess: the scan ran on every class


def test_a_dry_run_prints_every_stage_and_writes_nothing(
    dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from auditor.cli import main

    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], sanity={"n_images": 4, "n_blocks": 1})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert not (tmp_path / "run").exists()
    text = capsys.readouterr().out
    for stage in ("main pass", "expensive subset", "randomization test (MPRT)", "analysis cues", "analysis concepts"):
        assert re.search(rf"^{re.escape(stage)} +[\d,]+ +[\d,]+ +[\d.]+ (s|min|h) ", text, re.M), stage
    assert re.search(r"a forward takes \d+\.\d+ ms an image", text) and "total: ~" in text

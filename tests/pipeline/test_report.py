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


def test_gate_report_and_compare_run_without_torch(dataset_dir: Path, tmp_path: Path) -> None:
    """The commands that read finished runs work in a process where ``import torch`` fails."""
    import json
    import subprocess
    import sys

    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam", "hires_cam"])
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--no-progress"]) == 0
    before = (run / "report.html").read_text()
    code = (
        "import sys\n"
        "class Block:  # any import of torch now raises ImportError\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from auditor.cli import main\n"
        f"run = {str(run)!r}\n"
        "codes = [main(['gate', run]), main(['report', run]), main(['compare', run, run, '--out', run + '/c.html'])]\n"
        "assert 'torch' not in sys.modules\n"
        "print(codes)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes[1:] == [0, 0] and codes[0] in (0, 1)  # the gate may fail: this model learned the sky
    assert (run / "c.html").exists() and (run / "report.html").read_text() == before  # re-rendered identically


def _summary(accuracy: float, ci_low: float, per_class: dict[str, int], analyses: dict) -> dict:  # type: ignore[type-arg]
    return {
        "config": {},
        "dataset": {"per_class": per_class, "id": "x"},
        "accuracy": {"*": {"accuracy": accuracy, "ci_low": ci_low, "ci_high": accuracy, "n": sum(per_class.values())}},
        "aggregates": {},
        "analyses": analyses,
    }


TESTED = {"cues": {"a": {"effect": 0.0}}}  # the region scan ran


def test_a_model_at_chance_or_an_untested_run_is_inconclusive_not_clean() -> None:
    from auditor.outputs.report import _verdict

    hundred = {f"c{i}": 10 for i in range(100)}
    # a 100-class model at 1.1% (chance: 1%) once read "No shortcut found" in green
    status, headline, _ = _verdict(_summary(0.011, 0.005, hundred, TESTED), [])
    assert status == "inconclusive" and "does not beat always answering the most common class (0.010)" in headline
    # a working model whose run could intervene: the gate's own verdict
    assert _verdict(_summary(0.9, 0.85, hundred, TESTED), [])[:2] == ("pass", "No shortcut found")
    # a working model, but nothing that confirms a shortcut by intervention ran
    status, headline, _ = _verdict(_summary(0.9, 0.85, hundred, {"global": {"a": {"delta": [0, 0, 0]}}}), [])
    assert status == "inconclusive" and "no analysis that tests a shortcut by intervening" in headline
    # the counterfactual (masks) counts as an intervention; a failing rule is never softened
    cf = {"counterfactual": {"a": {"n": 3}}}
    assert _verdict(_summary(0.9, 0.85, {"a": 5, "b": 5}, cf), [])[0] == "pass"
    # ... unless its removals left too little of the image (large objects): then nothing was tested
    cf = {"counterfactual": {"a": {"n": 3, "measurable": False}}}
    assert _verdict(_summary(0.9, 0.85, {"a": 5, "b": 5}, cf), [])[0] == "inconclusive"
    high = [
        {"id": "region_cue/a/*", "kind": "region_cue", "class": "a", "attribute": None, "severity": "high"}
        | {"methods": [], "message": "m", "score": 1.0, "region": None, "evidence": {}}
    ]
    assert _verdict(_summary(0.011, 0.005, hundred, {}), high)[0] == "fail"


def test_the_class_cards_chart_what_the_metric_registry_marks() -> None:
    from auditor.metrics import METRICS
    from auditor.metrics.registry import metric_columns
    from auditor.outputs.classes import CHARTED_BEFORE, charted

    marked = [n for n, m in METRICS.items() if m.charted]
    assert sorted(marked) == sorted(CHARTED_BEFORE)  # the registry took over the report's hand-kept list
    columns = metric_columns(["energy_in_mask", "mask_iou", "deletion_auc"])
    assert charted({"metric_columns": columns}) == ["energy_in_mask", "deletion_auc"]
    assert charted({"metric_columns": {"x": {"metric": "x", "direction": "higher"}}}) == list(CHARTED_BEFORE)


def test_many_classes_get_cards_for_the_flagged_first_and_a_row_each() -> None:
    """Classes that flags name come first (most severe flag first), then model order; every class is a table
    row with its flags, hotspot and the analyses the triage left out; the hotspot grid is a 32 x 32 PNG."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from auditor.outputs.classes import _heat, class_order, class_rows

    classes = [f"c{i}" for i in range(5)]
    flags = [
        {"class": "c3", "severity": "high"},
        {"class": None, "severity": "medium"},
        {"class": "c1", "severity": "low"},
        {"class": "c3", "severity": "low"},
    ]
    assert class_order(classes, flags) == ["c3", "c1", "c0", "c2", "c4"]
    summary = {
        "dataset": {"classes": classes},
        "accuracy": {c: {"n": 10, "accuracy": 0.9} for c in classes},
        "analyses": {
            "hotspots": {"grad_cam": {"c1": {"location": "the top-left corner", "lift": 3.0}}},
            "triage": {"cues": {"c0": "why", "c1": "why"}, "frame": {"c0": "why"}},
        },
    }
    rows = {r["cls"]: r for r in class_rows(summary, flags, "grad_cam")}
    assert list(rows) == ["c3", "c1", "c0", "c2", "c4"]
    assert (rows["c3"]["flags"], rows["c3"]["severity"], rows["c3"]["rank"]) == (2, "high", 3)
    assert rows["c1"]["hotspot"] == "the top-left corner" and rows["c1"]["triaged"] == "cues"
    assert rows["c0"]["triaged"] == "cues, frame" and rows["c4"]["severity"] == "" and rows["c4"]["lift"] is None
    diff = np.zeros((32, 32))
    diff[0, 0], diff[31, 31], diff[5, 5] = 50, -25, 1  # 1 is under 5% of the peak: background
    png = Image.open(io.BytesIO(base64.b64decode(_heat(diff.tolist()).split(",", 1)[1]))).convert("RGB")
    pix = np.asarray(png)
    assert pix.shape == (32, 32, 3)
    assert pix[0, 0].tolist() == [0xC0, 0x39, 0x2B] and pix[5, 5].tolist() == [0xF4, 0xF4, 0xF4]
    assert pix[31, 31, 2] > pix[31, 31, 0]  # blue: the class's maps fall short of the others'


def test_summary_json_keeps_arrays_of_numbers_on_one_line_and_strings_untouched() -> None:
    import json
    import math

    from auditor.store.rundir import dumps

    obj = {"grid": [[1, 2.5, -3e-05], [math.nan, True]], "s": "[1,\n 2]", "names": ["x", "y"], "e": [], "n": {"m": [1]}}
    text = dumps(obj)
    assert "[1, 2.5, -3e-05]" in text and "[null, true]" in text and '"m": [1]' in text
    assert json.loads(text) == {**obj, "grid": [[1, 2.5, -3e-05], [None, True]]}  # NaN written as null
    assert '"x",\n' in text  # arrays of strings stay one item a line

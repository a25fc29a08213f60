"""The command line: exit codes and the methods listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from auditor import CAMS
from auditor.cli import main
from auditor.metrics import METRICS


def test_methods_lists_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in CAMS.names() + METRICS.names():
        assert name in out


def test_methods_json_has_costs_and_references(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["methods"]
    assert [r["name"] for r in rows] == CAMS.names()
    assert all(r["forwards"] and r["backwards"] and r["reference"] for r in rows)
    assert {r["name"] for r in rows if r["set"] == "fast"} == {"grad_cam", "grad_cam_pp", "hires_cam", "layer_cam"}
    metrics = json.loads(main_json())["metrics"]
    assert [r["name"] for r in metrics] == METRICS.names()


def main_json() -> str:
    proc = subprocess.run([sys.executable, "-m", "auditor", "methods", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0
    return proc.stdout


def test_usage_error_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "auditor", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr

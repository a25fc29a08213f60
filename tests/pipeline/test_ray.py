"""The Ray Data backend on a local 2-CPU Ray (started once for the session): the same results as the local
backend, the analyses' work items on the actors, and a batch that fails once on an actor is retried and
committed once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from auditor.cli import main
from auditor.run.access import ModelAccess
from tests.pipeline.conftest import make_config
from tests.pipeline.test_shards import _assert_same_run

ray = pytest.importorskip("ray", reason="the Ray backend needs pip install 'auditor[ray]'")

FLAKY = '''
import json
import os
from pathlib import Path

from tests.pipeline.tinynet import TinyNet

MARKER = "{marker}"
DRIVER = {driver}  # the driver's own forwards (planning, the reduce stage) never fail


class Flaky(TinyNet):
    """TinyNet whose first batch forward on a Ray actor fails once (a worker lost mid-batch)."""

    def forward(self, x):
        marker = Path(MARKER)
        if os.getpid() != DRIVER and x.shape[0] >= 4 and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("injected failure")
        return super().forward(x)


def build():
    return Flaky(2)
'''


@pytest.fixture(scope="module")
def local_ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = str(Path(__file__).parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    yield ray
    ray.shutdown()


def test_ray_backend_equals_the_local_backend(local_ray: Any, dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, expensive={"subset": "flagged", "per_class": 3})
    assert main(["run", str(cfg), "--out", str(tmp_path / "local"), "--no-progress"]) == 0
    args = ["run", str(cfg), "--out", str(tmp_path / "ray"), "--no-progress", "--backend", "ray", "--actors", "2"]
    assert main(args) == 0
    _assert_same_run(tmp_path / "local", tmp_path / "ray")


def test_the_analyses_work_items_run_on_the_actors_and_equal_the_local_run(
    local_ray: Any, dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam", "layer_cam"], metrics=["energy_in_mask"])
    assert main(["run", str(cfg), "--out", str(tmp_path / "local"), "--no-progress"]) == 0

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an analysis intervention ran in the driver, not on an actor")

    for name in ("region_test", "scan", "shift_test", "graft_test"):  # only the actors intervene
        monkeypatch.setattr(ModelAccess, name, refuse)
    args = ["run", str(cfg), "--out", str(tmp_path / "ray"), "--no-progress", "--backend", "ray", "--actors", "2"]
    assert main(args) == 0
    _assert_same_run(tmp_path / "local", tmp_path / "ray")
    local = json.loads((tmp_path / "local" / "summary.json").read_text())["analyses"]
    remote = json.loads((tmp_path / "ray" / "summary.json").read_text())["analyses"]
    assert remote["forwards"] == local["forwards"] and remote["triage"] == local["triage"]
    assert sum(local["forwards"][a] for a in ("cues", "frame", "properties")) > 0  # items did run
    assert sorted(p.name for p in (tmp_path / "ray" / "items").rglob("*.json")) == sorted(
        p.name for p in (tmp_path / "local" / "items").rglob("*.json")
    )
    assert not list((tmp_path / "ray").glob(".analysis-*"))  # the actors removed their grid files before they stopped


def test_a_batch_that_fails_once_is_retried_and_counted_once(local_ray: Any, dataset_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "flaky.py").write_text(FLAKY.replace("{marker}", str(marker)).replace("{driver}", str(os.getpid())))
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    text = cfg.read_text().replace(str(Path(__file__).with_name("tinynet.py")), str(tmp_path / "flaky.py"))
    cfg.write_text(text)
    out = tmp_path / "ray"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress", "--backend", "ray", "--actors", "1"]) == 0
    assert marker.exists()  # the failure happened
    import pandas as pd

    table = pd.read_parquet(out / "samples.parquet")
    assert len(table) == 24 and table["row"].is_unique


def test_a_batch_that_keeps_failing_stops_the_run_naming_its_samples(
    local_ray: Any, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = FLAKY.replace("{marker}", str(tmp_path / "never")).replace("{driver}", str(os.getpid()))
    (tmp_path / "broken.py").write_text(broken.replace("not marker.exists()", "True"))  # fails on every try
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    cfg.write_text(cfg.read_text().replace(str(Path(__file__).with_name("tinynet.py")), str(tmp_path / "broken.py")))
    out = tmp_path / "ray"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress", "--backend", "ray", "--actors", "1"]) == 3
    err = capsys.readouterr().err
    assert "failed 2 times on the workers (RuntimeError: injected failure); its samples: ['images/" in err


def test_a_ray_run_resumes_from_its_committed_batches(local_ray: Any, dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    args = ["run", str(cfg), "--no-progress", "--backend", "ray", "--actors", "2"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    resumed = tmp_path / "resumed"
    for name in ("summary.json", "samples.parquet", "report.html"):  # as if stopped after the map stage
        (resumed / name).unlink()
    kept = sorted((resumed / "parts").glob("part-*.parquet"))
    for part in kept[1::2]:  # and half its batches were never committed
        part.unlink()
    assert main([*args, "--out", str(resumed)]) == 0
    _assert_same_run(tmp_path / "clean", resumed)

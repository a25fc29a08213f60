"""Sharded runs: N processes each audit ``sha1(id) mod N`` of the samples, ``auditor merge`` reduces them,
and the result equals the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditor.cli import main
from auditor.run.access import ModelAccess
from auditor.run.setup import shard_of
from tests.pipeline.conftest import kill_after_parts, make_config
from tests.pipeline.test_golden import _round, assert_close


def _run(*args: str) -> int:
    return main([*args, "--no-progress"])


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["method", "target", "row"]).reset_index(drop=True)


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _sorted(pd.read_parquet(a / "samples.parquet")), _sorted(pd.read_parquet(b / "samples.parquet"))
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
    for col in ta.columns:
        if ta[col].dtype.kind == "f":
            np.testing.assert_allclose(ta[col], tb[col], rtol=1e-4, atol=1e-6, err_msg=col)
        else:
            assert ta[col].tolist() == tb[col].tolist(), col
    for sub in ("maps", "curves"):
        names = sorted(p.name for p in (a / sub).glob("*.npy"))
        assert names == sorted(p.name for p in (b / sub).glob("*.npy"))
        for name in names:
            np.testing.assert_allclose(np.load(a / sub / name), np.load(b / sub / name), rtol=1e-3, atol=1e-4)
    fa = json.loads((a / "flags.json").read_text())["flags"]
    fb = json.loads((b / "flags.json").read_text())["flags"]
    assert [(f["id"], f["severity"]) for f in fa] == [(f["id"], f["severity"]) for f in fb]
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["dataset"] == sb["dataset"] and sa["accuracy"] == sb["accuracy"]
    # the aggregates and every dataset-level number, not only the flags' ids (README: "rows, maps, aggregates
    # and flags"); float rounding only
    for key in ("aggregates", "groups", "analyses", "sanity"):
        assert_close(_round(sb[key]), _round(sa[key]), key)
    ga = json.loads((a / "flags.json").read_text())["findings"]
    gb = json.loads((b / "flags.json").read_text())["findings"]
    assert [(g["id"], g["severity"], g["flags"]) for g in ga] == [(g["id"], g["severity"], g["flags"]) for g in gb]


@pytest.mark.parametrize("subset", ["stratified", "flagged"])
def test_three_shards_and_merge_equal_the_one_process_run(dataset_dir: Path, tmp_path: Path, subset: str) -> None:
    cfg = make_config(dataset_dir, tmp_path, expensive={"subset": subset, "per_class": 3}, sanity={"n_images": 4})
    assert _run("run", str(cfg), "--out", str(tmp_path / "one")) == 0
    sharded = tmp_path / "sharded"
    # one shard in a separate process (as torchrun would start it, from its environment), two in this one
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "auditor", "run", str(cfg), "--out", str(sharded), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _run("merge", str(sharded)) == 2  # shards 0 and 1 are missing: refused, naming them
    for i in range(2):
        assert _run("run", str(cfg), "--out", str(sharded), "--num-shards", "3", "--shard-id", str(i)) == 0
    assert _run("merge", str(sharded)) == 0
    _assert_same_run(tmp_path / "one", sharded)
    assert (sharded / "report.html").exists()


def test_shards_split_by_id_hash_and_merge_refuses_foreign_or_unfinished_shards(
    dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"images/{c}_{i:04d}.png" for c in ("disc", "square") for i in range(12)]
    shares = [sum(shard_of(i, 3) == k for i in ids) for k in range(3)]
    assert sum(shares) == 24 and min(shares) > 0  # every sample in exactly one shard
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    out = tmp_path / "r"
    for i in range(2):
        assert _run("run", str(cfg), "--out", str(out), "--num-shards", "2", "--shard-id", str(i)) == 0
    (out / "shards" / "1-of-2" / "done.json").unlink()  # as if killed before its end
    assert _run("merge", str(out)) == 2
    assert "['1-of-2'] unfinished" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    other = make_config(dataset_dir, tmp_path / "other", methods=["grad_cam", "hires_cam"], metrics=["energy_in_mask"])
    assert _run("run", str(other), "--out", str(out), "--num-shards", "2", "--shard-id", "1") == 2  # not its run
    assert _run("run", str(cfg), "--out", str(out), "--num-shards", "2", "--shard-id", "1") == 0  # resumes
    assert _run("merge", str(out)) == 0
    assert _run("run", str(cfg), "--out", str(out), "--num-shards", "2", "--shard-id", "2") == 2


def test_a_shard_killed_mid_run_resumes_and_the_merge_is_unchanged(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, batch_size=2)
    assert _run("run", str(cfg), "--out", str(tmp_path / "one")) == 0
    out = tmp_path / "sharded"
    args = [sys.executable, "-m", "auditor", "run", str(cfg), "--out", str(out), "--no-progress", "--num-shards", "2"]
    kill_after_parts([*args, "--shard-id", "0"], out / "shards" / "0-of-2" / "parts", 2)
    assert not (out / "shards" / "0-of-2" / "done.json").exists()  # killed before its end
    for i in (0, 1):  # shard 0 resumes from its committed batches
        assert _run("run", str(cfg), "--out", str(out), "--num-shards", "2", "--shard-id", str(i)) == 0
    assert _run("merge", str(out)) == 0
    _assert_same_run(tmp_path / "one", out)


def test_the_analyses_work_items_shared_out_by_merge_shards_equal_the_one_process_run(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(
        dataset_dir, tmp_path, methods=["grad_cam", "layer_cam"], expensive={"subset": "flagged", "per_class": 3}
    )
    assert _run("run", str(cfg), "--out", str(tmp_path / "one")) == 0
    out = tmp_path / "sharded"
    for i in range(2):
        assert _run("run", str(cfg), "--out", str(out), "--num-shards", "2", "--shard-id", str(i)) == 0
    # the two shares at once: one in another process; whichever takes the lock first gathers the shards and
    # runs the flagged pass, the other waits for it and resumes from what it gathered
    other = subprocess.Popen(
        [sys.executable, "-m", "auditor", "merge", str(out), "--no-progress", "--num-shards", "2", "--shard-id", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _run("merge", str(out), "--num-shards", "2", "--shard-id", "0") == 0
    stdout, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    assert "analysis work items done" in stdout and not (out / "summary.json").exists()
    one_items = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "items").rglob("*.json"))
    assert one_items and sorted(p.relative_to(out) for p in (out / "items").rglob("*.json")) == one_items

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the final merge ran an item the shards had done")

    for name in ("region_test", "scan", "shift_test", "graft_test"):
        monkeypatch.setattr(ModelAccess, name, refuse)
    assert _run("merge", str(out)) == 0
    _assert_same_run(tmp_path / "one", out)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["analyses"]
    merged = json.loads((out / "summary.json").read_text())["analyses"]
    assert merged["forwards"] == one["forwards"] and sum(one["forwards"].values()) > 0
    for run in (tmp_path / "one", out):  # every process removed its analysis grid files when it was done
        assert not list(run.glob(".analysis-*")), run

"""Outputs unchanged across refactors: two runs through the public CLI against a committed text snapshot.

The snapshot (``golden/*.json``) was written by the code before the run-architecture refactor. It holds
every row of ``samples.parquet`` (floats to 7 significant digits), the summary's aggregates, accuracy,
groups, analyses and sanity results, ``flags.json``, ``expensive.json`` and a checksum of every map and
curve. A change that moves any of them fails here; an intended change regenerates the snapshot with
``AUDITOR_UPDATE_GOLDEN=1 python -m pytest tests/pipeline/test_golden.py`` and says why in its commit.

The model's weights are committed as text (``golden/tinynet_weights.json``), not trained by the test:
training amplifies the last-bit differences between CPUs (oneDNN's instruction set, the thread count) into
weights that differ by ~1e-4, and so into other maps and curves on every machine. Given the same weights the
audit itself agrees across machines to ~2e-6 relative (measured), which the second case checks: the same run
in a process with the scalar ATen kernels, oneDNN capped at SSE4.1 and one thread must match the snapshot too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from auditor.cli import main
from tests.pipeline.conftest import make_config

GOLDEN = Path(__file__).with_name("golden")
CONFIGS: dict[str, dict[str, Any]] = {
    # every stage of the default path: cheap + costly methods, both targets, MPRT and agreement, deep dive
    "stratified": {
        "methods": ["grad_cam", "hires_cam", "layer_cam", "occlusion"],
        "target": "both",
        "sanity": {"methods": ["grad_cam", "layer_cam"], "n_images": 4, "n_blocks": 2},
    },
    # the flagged second pass
    "flagged": {"expensive": {"subset": "flagged", "per_class": 3}},
}
# Another machine, as far as one process can emulate it: other kernels, other summation orders.
ELSEWHERE = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR AVX2 FMA3",
}


def golden_checkpoint(folder: Path) -> Path:
    """The committed weights of the snapshot's TinyNet, written as a state_dict checkpoint."""
    spec = json.loads((GOLDEN / "tinynet_weights.json").read_text())
    state = {
        k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"]) for k, v in spec.items()
    }
    path = folder / "golden.pt"
    torch.save(state, path)
    return path


def _round(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.7g}")
    return x


def snapshot(out: Path) -> dict[str, Any]:
    """The parts of a finished run that a refactor must not change, as rounded JSON-ready data."""
    table = pd.read_parquet(out / "samples.parquet")
    table["path"] = [Path(p).name for p in table["path"]]
    table = table.sort_values(["method", "target", "row"], kind="stable").reset_index(drop=True)
    rows = [{k: _round(v) for k, v in r.items()} for r in table.to_dict(orient="records")]
    summary = json.loads((out / "summary.json").read_text())
    arrays = {}
    for sub in ("maps", "curves"):
        for f in sorted((out / sub).glob("*.npy")):
            a = np.load(f).astype(np.float64)
            arrays[f"{sub}/{f.name}"] = {
                "shape": list(a.shape),
                "finite": int(np.isfinite(a).sum()),
                "sum": _round(float(np.nansum(a))),
                "index_weighted_sum": _round(float(np.nansum(a * np.arange(1, a.size + 1).reshape(a.shape)))),
            }
    return {
        "columns": list(table.columns),
        "rows": rows,
        "summary": _round({k: summary.get(k) for k in ("aggregates", "accuracy", "groups", "analyses", "sanity")}),
        "dataset": _round({k: summary["dataset"][k] for k in ("n", "per_class", "with_mask", "id")}),
        "deep_dive": summary.get("deep_dive"),
        "flags": _round(json.loads((out / "flags.json").read_text())),
        "expensive": _round(json.loads((out / "expensive.json").read_text())),
        "arrays": arrays,
    }


# The documented cross-machine tolerance (README, "Reproducibility"): maps are stored as float16, whose step is
# 4.9e-4 relative, and differences of probabilities (occlusion, hotspot differences) cancel digits.
REL_TOL, ABS_TOL = 1e-3, 1e-5


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal structure, strings, ids and integers; floats within the documented cross-machine tolerance."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(set(got) ^ set(want))} differ"
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, int | float), f"{where}: {got!r} != {want!r}"
        assert math.isclose(got, want, rel_tol=REL_TOL, abs_tol=ABS_TOL), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("where", ["here", "elsewhere"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_the_snapshot(name: str, where: str, dataset_dir: Path, tmp_path: Path) -> None:
    model = {"checkpoint": str(golden_checkpoint(tmp_path))}
    cfg = make_config(dataset_dir, tmp_path, **CONFIGS[name], model=model)
    out = tmp_path / "run"
    command = ["run", str(cfg), "--out", str(out), "--no-progress"]
    if where == "here":
        assert main(command) == 0
    else:
        env = {**os.environ, **ELSEWHERE}
        probe = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
        seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert seen.stdout.split() == ["DEFAULT", "1"], seen.stdout  # the emulation took effect
        done = subprocess.run([sys.executable, "-m", "auditor", *command], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(json.dumps(snapshot(out)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("AUDITOR_UPDATE_GOLDEN") and where == "here":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert_close(got, want, name)

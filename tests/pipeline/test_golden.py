"""Outputs unchanged across refactors: two runs through the public CLI against a committed text snapshot.

The snapshot (``golden/*.json``) was written by the code before the run-architecture refactor. It holds
every row of ``samples.parquet`` (floats to 7 significant digits), the summary's aggregates, accuracy,
groups, analyses and sanity results, ``flags.json``, ``expensive.json`` and a checksum of every map and
curve. A change that moves any of them fails here; an intended change regenerates the snapshot with
``AUDITOR_UPDATE_GOLDEN=1 python -m pytest tests/pipeline/test_golden.py`` and says why in its commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

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


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal structure and strings; floats equal to 1e-5 relative (7 digits were kept)."""
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
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_the_snapshot(name: str, dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, **CONFIGS[name])
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    got = json.loads(json.dumps(snapshot(out)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("AUDITOR_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert_close(got, want, name)

"""Scale-out figures: the local loop against Ray with 1 and 2 actors, and the reduce stage on large tables.

    python benchmarks/scale.py backends --images 400     # auditor run, local vs --backend ray (1, 2 actors)
    python benchmarks/scale.py reduce --rows 10000 100000 # aggregates + analyses + flags on synthetic rows

``backends`` runs ``python -m auditor run`` in child processes (resnet18 @ 64², grad_cam + localization,
untrained) and reports the main pass's images/s from each run's own timings and the whole command's wall
time (Ray's start-up included). ``reduce`` writes a synthetic run directory (one method, 7x7 maps, masks'
object grids, two classes, a metadata column) and times the model-free part of the reduce stage, the part
that grows with the dataset, in a child process whose peak RSS it reports. Interventions and the deep
dive touch a fixed number of images and are not included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
import yaml

from auditor.synthetic import write_dataset


def backends(args: argparse.Namespace) -> None:
    work = args.work
    data = work / f"data-{args.images}"
    if not (data / "audit.csv").exists():
        write_dataset(data, args.images // 2, size=64, seed=1, weather_bias=0.5)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), work / "r18.pt")
    cfg = {
        "model": {"arch": "resnet18", "num_classes": 2, "checkpoint": str(work / "r18.pt")},
        "data": {"manifest": str(data / "audit.csv"), "image_size": 64},
        "methods": ["grad_cam"],
        "metrics": ["energy_in_mask", "pointing_game", "box_iou"],
        "batch_size": 32,
        "memory_format": "contiguous",
    }
    (work / "scale.yaml").write_text(yaml.safe_dump(cfg))
    print("| backend | images | wall s | main pass img/s | x local |\n|---|---|---|---|---|")
    base = None
    for name, extra in (
        ("local", []),
        ("ray, 1 actor", ["--backend", "ray", "--actors", "1"]),
        ("ray, 2 actors", ["--backend", "ray", "--actors", "2"]),
    ):
        out = work / f"run-{name.replace(' ', '').replace(',', '')}"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "auditor", "run", str(work / "scale.yaml"), "--out", str(out), "--force"]
        subprocess.run([*cmd, "--no-progress", *extra], check=True, capture_output=True)
        wall = time.perf_counter() - start
        t = json.loads((out / "summary.json").read_text())["timings"]
        rate = args.images / max(t.get("compute", 0) + t.get("data_wait", 0) + t.get("write", 0), 1e-9)
        base = base or rate
        print(f"| {name} | {args.images} | {wall:.0f} | {rate:.1f} | {rate / base:.2f} |")


def _synthetic_run(root: Path, n: int, seed: int = 0) -> None:
    from auditor.store.rundir import RunStore

    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 2 == 0, "a", "b")
    correct = rng.random(n) < 0.9
    table = pd.DataFrame(
        {
            "row": np.arange(n),
            "id": [f"img{i:07d}" for i in range(n)],
            "path": [f"img{i:07d}.png" for i in range(n)],
            "label": labels,
            "pred": np.where(correct, labels, np.where(labels == "a", "b", "a")),
            "prob": rng.random(n),
            "correct": correct,
            "method": "grad_cam",
            "target": "label",
            "target_class": labels,
            "target_prob": rng.random(n),
            "map_valid": True,
            "expensive": rng.random(n) < 0.01,
            "mask_source": "mask",
            "sha1": [f"{i:040x}" for i in range(n)],
            "energy_in_mask": rng.random(n),
            "energy_in_mask_chance": rng.uniform(0.1, 0.3, n),
            "pointing_game": (rng.random(n) < 0.5).astype(float),
            "pointing_game_chance": rng.uniform(0.1, 0.3, n),
            "site": rng.choice(["x", "y", "z"], n),
        }
    )
    for p in ("brightness", "contrast", "red", "green", "blue", "sharpness"):
        table[f"prop_{p}"] = rng.random(n)
    store = RunStore(root, n)
    for start in range(0, n, 10_000):
        rows = np.arange(start, min(n, start + 10_000))
        store.maps("grad_cam__label", (7, 7))[rows] = rng.random((len(rows), 7, 7)).astype(np.float16)
        store.objects((32, 32))[rows] = (rng.random((len(rows), 32, 32)) < 0.2).astype(np.float16)
    store.flush()
    table.to_parquet(root / "samples.parquet", index=False)


def _reduce_child(root: Path) -> None:
    from auditor.run import aggregate
    from auditor.shortcuts.catalog import Thresholds, run_analyses
    from auditor.shortcuts.registry import AnalysisInputs
    from auditor.store.rundir import RunDir, one_row_per_sample

    start = time.perf_counter()
    rundir = RunDir(root)
    table = rundir.read_table()
    first = one_row_per_sample(table)
    cols = ["energy_in_mask", "energy_in_mask_chance", "pointing_game", "pointing_game_chance"]
    aggregate.aggregates(table, rundir, ["a", "b"], cols, 0)
    aggregate.accuracy(first, ["a", "b"], 0)
    aggregate.groups(first, ["site"])
    inputs = AnalysisInputs(table, "label", ["grad_cam"], ["a", "b"], ["site"], rundir, Thresholds())
    _, flags = run_analyses(inputs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "flags": len(flags)}))


def reduce(args: argparse.Namespace) -> None:
    print("| rows | reduce s (aggregates + analyses + flags) | peak RSS MiB | flags |\n|---|---|---|---|")
    for n in args.rows:
        root = args.work / f"reduce-{n}"
        if not (root / "samples.parquet").exists():
            _synthetic_run(root, n)
        done = subprocess.run(
            [sys.executable, __file__, "reduce-child", str(root)], check=True, capture_output=True, text=True
        )
        res = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {n} | {res['seconds']:.1f} | {res['peak_mib']:.0f} | {res['flags']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backends")
    b.add_argument("--images", type=int, default=400)
    r = sub.add_parser("reduce")
    r.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    c = sub.add_parser("reduce-child")
    c.add_argument("root", type=Path)
    for p in (b, r):
        p.add_argument("--work", type=Path, default=Path("/tmp/auditor-scale"))
    args = parser.parse_args()
    if args.what == "reduce-child":
        _reduce_child(args.root)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    backends(args) if args.what == "backends" else reduce(args)


if __name__ == "__main__":
    main()

"""Throughput and peak memory of ``auditor run`` against the dataset size.

    python benchmarks/pipeline.py --images 1000 10000       # resnet18 @ 224, grad_cam + localization

Generates the synthetic scenes once per size (PNG + mask + CSV), then runs ``python -m auditor run`` in a
child process and reads the child's peak resident memory (``ru_maxrss``) and the run's own timings.
Memory must not grow with the dataset: the run holds no list of images or maps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
import yaml

from auditor.synthetic import write_dataset

LOCALIZATION = [
    "energy_in_mask",
    "energy_outside_mask",
    "pointing_game",
    "relevance_rank_accuracy",
    "mask_iou",
    "box_iou",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=Path("/tmp/auditor-bench"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = args.work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), ckpt)
    print("| images | wall s | images/s (run timings) | peak RSS MiB | cams s | metrics s | data wait s |")
    print("|---|---|---|---|---|---|---|")
    for n in args.images:
        data = args.work / f"data-{n}-{args.size}"
        if not (data / "audit.csv").exists():
            write_dataset(data, n // 2, size=args.size, seed=1, weather_bias=0.5)
        cfg = {
            "model": {"arch": "resnet18", "num_classes": 2, "checkpoint": str(ckpt)},
            "data": {"manifest": str(data / "audit.csv"), "image_size": args.size},
            "methods": ["grad_cam"],
            "metrics": LOCALIZATION,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": "cpu",
        }
        cfg_path = args.work / f"audit-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out = args.work / f"run-{n}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "auditor", "run", str(cfg_path), "--out", str(out), "--force", "--no-progress"],
            check=True,
        )
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if peak <= before:
            print(f"(peak RSS of this child not above an earlier child's {before} KiB; run sizes separately)")
        timings = json.loads((out / "summary.json").read_text())["timings"]
        metrics_s = sum(v for k, v in timings.items() if k.startswith("metric:"))
        print(
            f"| {n} | {wall:.0f} | {timings['images_per_s_this_session']:.1f} | {peak / 1024:.0f} | "
            f"{timings.get('cams', 0):.0f} | {metrics_s:.0f} | {timings.get('data_wait', 0):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

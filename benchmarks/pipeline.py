"""Throughput and peak memory of ``auditor run``, against the model's own forward+backward throughput.

    python benchmarks/pipeline.py --images 1000              # resnet18 @ 224, grad_cam + localization
    python benchmarks/pipeline.py --images 512 --fast        # the default ("fast") method and metric set
    python benchmarks/pipeline.py --images 1000 --fast --per-class 50   # the default config, subset included

Generates the synthetic scenes once per size (PNG + mask + CSV), then runs ``python -m auditor run`` in a
child process and reads the child's peak resident memory (``ru_maxrss``) and the run's own timings.
Memory must not grow with the dataset: the run holds no list of images or maps. Sizes given together
share one parent, so the peak RSS of the second is only meaningful when it exceeds the first's: run
sizes as separate invocations.

``--fast`` runs the config defaults (``methods: fast``, ``metrics: fast``) and prints, beside the run,
the model's floors measured in this process at the run's batch size: forward, forward + gradient to
the CAM layer, forward + full backward. The faithfulness metrics run on a fixed-size subset
(``--per-class`` samples per class), a cost that does not grow with the dataset: it is reported
apart, and the steady-state rate is the main pass without it. ``wall s`` is the whole command,
report included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
import yaml

from auditor.cams.speed import choose_memory_format
from auditor.metrics import METRICS
from auditor.synthetic import write_dataset

sys.path.insert(0, str(Path(__file__).parent))
from peak import peak_mib, wrapped
from run import floors  # benchmarks/ is a folder of scripts, not a package

LOCALIZATION = [name for name, m in METRICS.items() if m.family == "localization"]  # registry order
# faithfulness metrics: only on the expensive subset (a fixed cost, not per image)
SUBSET_METRICS = (
    "metric:average_drop",
    "metric:increase_in_confidence",
    "metric:deletion_auc",
    "metric:insertion_auc",
    "counterfactuals",  # 3 forwards per image of the stratified subset
)


def model_floors(arch: str, size: int, batch: int, device: str, repeat: int) -> tuple[dict[str, float], str]:
    """ms/image floors of a fresh ``arch`` at ``batch`` images of ``size``² (benchmarks/run.py's).

    The model is first put in the memory format that ``auditor run`` would choose for it (the faster
    forward), so the floors are the model's best, not a handicapped NCHW one.
    """
    model = getattr(torchvision.models, arch)(num_classes=2).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    fmt = choose_memory_format(model, x[:16])
    return floors(model, x, t, "layer4", repeat), fmt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/auditor-bench"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fast", action="store_true", help="the default method and metric set")
    parser.add_argument("--per-class", type=int, default=2, help="expensive subset per class (--fast)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of the floor measurements")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = args.work / f"{args.arch}.pt"
    torch.save(getattr(torchvision.models, args.arch)(num_classes=2).state_dict(), ckpt)
    floor, fmt = (
        model_floors(args.arch, args.size, args.batch_size, args.device, args.repeat) if args.fast else ({}, "")
    )
    rows = []
    for n in args.images:
        data = args.work / f"data-{n}-{args.size}"
        if not (data / "audit.csv").exists():
            write_dataset(data, n // 2, size=args.size, seed=1, weather_bias=0.5)
        cfg: dict[str, object] = {
            "model": {"arch": args.arch, "num_classes": 2, "checkpoint": str(ckpt)},
            "data": {"manifest": str(data / "audit.csv"), "image_size": args.size},
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": args.device,
        }
        if args.fast:
            cfg["expensive"] = {"per_class": args.per_class}
        else:
            cfg.update({"methods": ["grad_cam"], "metrics": LOCALIZATION})
        cfg_path = args.work / f"audit-{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out = args.work / f"run-{n}"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "auditor", "run", str(cfg_path), "--out", str(out), "--force", "--no-progress"]
        subprocess.run(wrapped(cmd, args.work / f"peak-{n}.kib"), check=True)
        wall = time.perf_counter() - t0
        peak = peak_mib([args.work / f"peak-{n}.kib"])  # this run's own (benchmarks/peak.py)
        summary = json.loads((out / "summary.json").read_text())
        rows.append((n, wall, peak, summary))
    if args.fast:
        fast_table(rows, floor, fmt, args)
    else:
        plain_table(rows)


def plain_table(rows: list[tuple[int, float, float, dict[str, object]]]) -> None:
    print("| images | wall s | images/s (run timings) | peak RSS MiB | cams s | metrics s | data wait s |")
    print("|---|---|---|---|---|---|---|")
    for n, wall, peak, summary in rows:
        timings: dict[str, float] = summary["timings"]  # type: ignore[assignment]
        metrics_s = sum(v for k, v in timings.items() if k.startswith("metric:"))
        print(
            f"| {n} | {wall:.0f} | {timings['images_per_s_this_session']:.1f} | {peak:.0f} | "
            f"{timings.get('cams', 0):.0f} | {metrics_s:.0f} | {timings.get('data_wait', 0):.0f} |"
        )


def fast_table(
    rows: list[tuple[int, float, float, dict[str, object]]], floor: dict[str, float], fmt: str, args: argparse.Namespace
) -> None:
    fwd, fwd_lg, fwd_bwd = floor["forward"], floor["forward+layer_grad"], floor["forward+full_backward"]
    methods: list[str] = rows[0][3]["config"]["methods"]  # type: ignore[index]
    own = fwd_lg  # one shared forward + layer gradient for every fast method; faithfulness is subset work
    print(
        f"\n# {args.arch} @ {args.size}², batch {args.batch_size}, {args.device}, workers {args.workers}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"floors (ms/image, min of {args.repeat}, {fmt}): forward {fwd:.1f}, forward+layer-grad {fwd_lg:.1f}, "
        f"forward+full backward {fwd_bwd:.1f}; the fast set's own floor "
        f"(one forward+layer-grad for {', '.join(methods)}) {own:.1f}; "
        "the runs' memory format: "
        f"{', '.join(str(r[3]['run']['memory_format']) for r in rows)}\n"  # type: ignore[index]
    )
    print(
        "| images | subset | wall s | main pass img/s | steady img/s | x fwd+bwd throughput | x own-floor throughput "
        "| subset s (per subset image) | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, wall, peak, summary in rows:
        t: dict[str, float] = summary["timings"]  # type: ignore[assignment]
        main_s = t.get("data_wait", 0) + t.get("compute", 0) + t.get("write", 0)
        subset_s = sum(t.get(k, 0) for k in SUBSET_METRICS)
        n_sub = summary["run"]["expensive_samples"]  # type: ignore[index]
        steady_ms = (main_s - subset_s) / n * 1e3
        print(
            f"| {n} | {n_sub} | {wall:.0f} | {n / main_s:.2f} | {1e3 / steady_ms:.2f} | "
            f"{fwd_bwd / steady_ms:.2f} | {own / steady_ms:.2f} | "
            f"{subset_s:.0f} ({subset_s / max(n_sub, 1):.1f}) | {peak:.0f} |"
        )
    print("\nsteady-state ms/image by stage (the subset's deletion/insertion excluded):\n")
    keys = ["cams", "metric:box_iou", "other metrics", "probes", "data_wait", "write"]
    print("| images | " + " | ".join(keys) + " | total |")
    print("|---" * (len(keys) + 2) + "|")
    for n, _wall, _peak, summary in rows:
        t = summary["timings"]  # type: ignore[assignment]
        known = {"cams", "metric:box_iou", *SUBSET_METRICS}
        other = sum(v for k, v in t.items() if k.startswith("metric:") and k not in known)
        vals = [t.get(k, 0.0) if k != "other metrics" else other for k in keys]
        main_s = (
            t.get("data_wait", 0) + t.get("compute", 0) + t.get("write", 0) - sum(t.get(k, 0) for k in SUBSET_METRICS)
        )
        print(f"| {n} | " + " | ".join(f"{v / n * 1e3:.1f}" for v in vals) + f" | {main_s / n * 1e3:.1f} |")


if __name__ == "__main__":
    main()

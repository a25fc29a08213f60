"""Scale-out figures: the local loop against Ray with 1 and 2 actors, and the reduce stage on large tables.

    python benchmarks/scale.py backends --images 400     # auditor run, local vs --backend ray (1, 2 actors)
    python benchmarks/scale.py reduce --rows 10000 100000 # aggregates + analyses + flags on synthetic rows
    python benchmarks/scale.py classes --classes 100 --per-class 10   # a many-class audit, by stage
    python benchmarks/scale.py classes --train 10 --backend ray      # ... on 2 Ray actors (or: shards)

``backends`` runs ``python -m auditor run`` in child processes (resnet18 @ 64², grad_cam + localization,
untrained) and reports the main pass's images/s from each run's own timings and the whole command's wall
time (Ray's start-up included). ``reduce`` writes a synthetic run directory (one method, 7x7 maps, masks'
object grids, two classes, a metadata column) and times the model-free part of the reduce stage, the part
that grows with the dataset, in a child process whose peak RSS it reports. Interventions and the deep
dive touch a fixed number of images and are not included. ``classes`` audits a resnet18 @ 64² (untrained, or
trained ``--train`` epochs on a training split of ``--train-images`` scenes a class) over
``classes x per-class`` random scenes (a coloured square on noise) with the default config in a child process,
and reports its stages' seconds (``summary.json → timings``), the analyses' counted forwards, the peak RSS,
``summary.json`` and ``report.html`` sizes, and the whole as a multiple of the default methods' shared
forward + backward over every image, measured here on the same model and batch. ``--backend ray`` runs it on 2
Ray actors (the map stage and the analyses' work items); ``--backend shards`` as 2 map shards, 2 shares of the
analyses' work items (``auditor merge --shard-id``) and the final merge, each pair at once with one torch thread
per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision
import yaml

from auditor.config import IMAGENET_MEAN, IMAGENET_STD
from auditor.synthetic import write_dataset

sys.path.insert(0, str(Path(__file__).parent))
from peak import own_peak_mib, peak_mib, wrapped  # benchmarks/ is a folder of scripts, not a package


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
    peak = own_peak_mib()  # not ru_maxrss: a child's counts its parent's memory at the spawn (benchmarks/peak.py)
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


def _scene(rng: np.random.Generator, colour: np.ndarray, size: int) -> np.ndarray:
    """Noise with a square of ``colour`` anywhere (once within the top-left: a fixed place), ``[size, size, 3]``."""
    img = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    x, y = rng.integers(0, size - size // 3 + 1, 2)
    img[y : y + size // 3, x : x + size // 3] = colour
    return img


def _many_classes(
    root: Path, classes: int, per_class: int, train_per_class: int = 0, seed: int = 0, size: int = 64
) -> None:
    """``audit.csv`` (``per_class`` scenes a class) and ``train.csv`` (``train_per_class``, other noise and places,
    the same colours: a training split of the same distribution; the audit set's draws do not depend on it).
    ``seed`` draws other colours, scenes and places (seed 0: the set every figure below 'seed' was measured on)."""
    from PIL import Image

    rng, other = np.random.default_rng(2 * seed), np.random.default_rng(2 * seed + 1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, str]]] = {"audit": [], "train": []}
    for c in range(classes):
        colour = rng.integers(0, 256, 3)
        for split, draw, n in (("audit", rng, per_class), ("train", other, train_per_class)):
            for i in range(n):
                name = f"images/{'t_' if split == 'train' else ''}c{c:04d}_{i:03d}.png"
                Image.fromarray(_scene(draw, colour, size)).save(root / name)
                rows[split].append({"path": name, "label": f"c{c:04d}"})
    for split, table in rows.items():
        pd.DataFrame(table, columns=["path", "label"]).to_csv(root / f"{split}.csv", index=False)


def _fb_floor(classes: int, images: int, size: int, batch: int) -> float:
    """Seconds of the default methods' shared forward + full backward over ``images`` images (one pass)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes).eval()
    x = torch.rand(batch, 3, size, size)
    model(x).max(1).values.sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(0, images, batch):
        model.zero_grad(set_to_none=True)
        model(x).max(1).values.sum().backward()
    return time.perf_counter() - start


def _tensors(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images (ImageNet-normalized, as the audit reads them) and class indices."""
    from PIL import Image

    table = pd.read_csv(data / f"{split}.csv")
    x = torch.stack([torch.from_numpy(np.array(Image.open(data / p).convert("RGB"))) for p in table["path"]])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255 - mean) / std, torch.tensor([int(c[1:]) for c in table["label"]])


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in x.split(256)]).eq(y).float().mean())


def _train(data: Path, classes: int, epochs: int, seed: int = 0) -> tuple[torchvision.models.ResNet, float, float]:
    """resnet18 trained on the training split (``train.csv``); returns the model and its accuracy on the
    training split and on the audit set. (Trained on the audit set itself, 10 images a class, it memorized the
    noise: 100% there, 12% on fresh scenes of the same colours, and it read the left half of every image.)"""
    x, y = _tensors(data, "train")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, _accuracy(model, x, y), _accuracy(model, *_tensors(data, "audit"))


def _together(commands: list[list[str]]) -> None:
    """Run ``commands`` at once, one torch thread each (two cores, two processes), and wait for all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for proc, command in zip(running, commands, strict=True):
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")


def _audit(config: Path, out: Path, backend: str) -> dict[str, float]:
    """The audit of ``config`` into ``out`` on ``backend`` (``local``; ``ray``: 2 actors; ``shards``: 2 map
    shards, 2 shares of the analyses' work items, the final merge); the wall seconds of each step."""
    auditor = [sys.executable, "-m", "auditor"]
    run = [*auditor, "run", str(config), "--out", str(out), "--no-progress"]
    peaks = [out.parent / f"peak-{out.name}-{i}.kib" for i in range(5)]
    if backend != "shards":
        extra = ["--backend", "ray", "--actors", "2"] if backend == "ray" else []
        subprocess.run(wrapped([*run, "--force", *extra], peaks[0]), check=True, capture_output=True)
        return {"peak MiB": peak_mib(peaks[:1])}
    shutil.rmtree(out, ignore_errors=True)
    steps, start = {}, time.perf_counter()
    _together([wrapped([*run, "--num-shards", "2", "--shard-id", str(i)], peaks[i]) for i in range(2)])
    steps["map shards"], start = time.perf_counter() - start, time.perf_counter()
    merge = [*auditor, "merge", str(out), "--no-progress"]
    _together([wrapped([*merge, "--num-shards", "2", "--shard-id", str(i)], peaks[2 + i]) for i in range(2)])
    steps["work-item shares"], start = time.perf_counter() - start, time.perf_counter()
    subprocess.run(wrapped(merge, peaks[4]), check=True, capture_output=True)
    steps["final merge"] = time.perf_counter() - start
    return {**steps, "peak MiB": peak_mib(peaks)}  # the largest of one process (Ray's actors are not counted)


def many_classes(args: argparse.Namespace) -> None:
    work, n = args.work, args.classes * args.per_class
    n_train = args.train_images if args.train else 0
    data = work / f"classes-{args.classes}x{args.per_class}+{n_train}" / f"seed{args.seed}"
    if not (data / "train.csv").exists():
        _many_classes(data, args.classes, args.per_class, n_train, args.seed)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=args.classes)
    if args.train:
        model, fit, acc = _train(data, args.classes, args.train, args.seed)
        print(f"trained {args.train} epochs on {n_train} images a class: accuracy {fit:.3f}, audit set {acc:.3f}")
    torch.save(model.state_dict(), work / f"r18-{args.classes}.pt")
    cfg: dict[str, Any] = {
        "model": {"arch": "resnet18", "num_classes": args.classes, "checkpoint": str(work / f"r18-{args.classes}.pt")},
        "data": {"manifest": str(data / "audit.csv"), "image_size": 64},
        "batch_size": 32,
    }
    if args.total != "default":
        cfg["expensive"] = {"total": None if args.total == "none" else int(args.total)}
    (work / "classes.yaml").write_text(yaml.safe_dump(cfg))
    out = work / f"run-classes-{args.backend}"
    start = time.perf_counter()
    steps = _audit(work / "classes.yaml", out, args.backend)
    wall = time.perf_counter() - start
    peak = steps.pop("peak MiB")
    if steps:
        print("steps (wall s):", ", ".join(f"{k} {v:.0f}" for k, v in steps.items()))
    summary = json.loads((out / "summary.json").read_text())
    t = summary["timings"]
    floor = _fb_floor(args.classes, n, 64, 32)
    main = t.get("compute", 0) + t.get("data_wait", 0) + t.get("write", 0)
    forwards = summary["analyses"].get("forwards", {})
    mib = 1024 * 1024
    severities = [f["severity"] for f in json.loads((out / "flags.json").read_text())["flags"]]
    cells = [
        ("classes x images", f"{args.classes} x {args.per_class}"),
        ("backend", args.backend),
        ("model", "trained" if args.train else "random"),
        ("expensive.total", args.total),
        ("expensive samples", summary["run"]["expensive_samples"]),
        ("wall s", f"{wall:.0f}"),
        ("main pass s", f"{main:.0f}"),
        ("analyses s", f"{t.get('analyses', 0):.0f}"),
        ("findings s", f"{t.get('findings', 0):.0f}"),
        ("deep dive s", f"{t.get('deep_dive', 0):.0f}"),
        ("analyses' forwards", sum(forwards.values())),
        ("peak RSS MiB", f"{peak:.0f}"),
        ("summary.json MB", f"{(out / 'summary.json').stat().st_size / mib:.1f}"),
        ("report MB", f"{(out / 'report.html').stat().st_size / mib:.1f}"),
        ("x forward+backward", f"{wall / floor:.0f} (floor {floor:.1f} s)"),
        ("flags high/medium/low", "/".join(str(severities.count(s)) for s in ("high", "medium", "low"))),
    ]
    print("| " + " | ".join(k for k, _ in cells) + " |")
    print("|" + "---|" * len(cells))
    print("| " + " | ".join(str(v) for _, v in cells) + " |")
    print("forwards by analysis:", json.dumps(forwards))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backends")
    b.add_argument("--images", type=int, default=400)
    r = sub.add_parser("reduce")
    r.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    m = sub.add_parser("classes")
    m.add_argument("--classes", type=int, default=100)
    m.add_argument("--per-class", type=int, default=10)
    m.add_argument("--total", default="default", help="expensive.total: default (the config's), none, or a number")
    m.add_argument("--train", type=int, default=0, help="epochs of training (0: an untrained model)")
    m.add_argument("--train-images", type=int, default=30, help="training scenes a class (apart from the audit's)")
    m.add_argument("--seed", type=int, default=0, help="the scenes' colours, noise and places, and the training")
    m.add_argument("--backend", choices=["local", "ray", "shards"], default="local", help="where the audit runs")
    c = sub.add_parser("reduce-child")
    c.add_argument("root", type=Path)
    for p in (b, r, m):
        p.add_argument("--work", type=Path, default=Path("/tmp/auditor-scale"))
    args = parser.parse_args()
    if args.what == "reduce-child":
        _reduce_child(args.root)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    {"backends": backends, "reduce": reduce, "classes": many_classes}[args.what](args)


if __name__ == "__main__":
    main()

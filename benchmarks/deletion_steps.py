"""How the deletion/insertion AUC depends on the step count, against the 1% reference (101 forwards a curve).

    python benchmarks/deletion_steps.py

Models: the demo's CNN (tank vs weather, 64 px, trained here in seconds) and the test suite's TinyNet
trained on three planted-shortcut datasets and the clean control (32 px). Maps: grad_cam and hires_cam.
For each step, the worst and mean absolute AUC error over every image, map method and curve against
step 0.01; the default step is the coarsest with a worst error below 0.01.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from auditor import compute_cams
from auditor.demo import MEAN, NAMES, STD, _load, train
from auditor.metrics import METRICS, MetricInputs
from auditor.synthetic import write_dataset
from tests.shortcuts import planted

STEPS = (0.01, 0.02, 0.025, 0.05, 0.1)


def _zoo(tmp: Path) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, list[float], list[float]]]:
    write_dataset(tmp / "train", 200, size=64, seed=0, weather_bias=1.0, labels=NAMES)
    write_dataset(tmp / "audit", 24, size=64, seed=1, weather_bias=0.5, labels=NAMES)
    x, y = _load(tmp / "audit")
    zoo = [("demo CNN 64px", train(tmp / "train"), x, y, list(MEAN), list(STD))]
    for kind in ("stamp", "colour", "texture", "control"):
        samples = planted.make(kind, 40, seed=0)
        model = planted.train(samples)
        xt, yt = planted.tensors(planted.make(kind, 12, seed=1))
        zoo.append((f"TinyNet {kind} 32px", model, xt, yt, [planted.MEAN] * 3, [planted.STD] * 3))
    return zoo


def main() -> None:
    torch.manual_seed(0)
    errors: dict[float, list[float]] = {s: [] for s in STEPS}
    with tempfile.TemporaryDirectory() as tmp:
        zoo = _zoo(Path(tmp))
    for name, model, x, y, mean, std in zoo:
        maps = compute_cams(model, x, y, methods=["grad_cam", "hires_cam"])
        for method in ("grad_cam", "hires_cam"):
            aucs = {}
            for step in STEPS:
                inputs = MetricInputs(
                    maps=maps[method].maps,
                    model=model,
                    images=x,
                    targets=y,
                    mean=torch.tensor(mean),
                    std=torch.tensor(std),
                    batch_size=64,
                )
                aucs[step] = [METRICS[m](inputs, step=step).value.numpy() for m in ("deletion_auc", "insertion_auc")]
            for step in STEPS[1:]:
                for got, ref in zip(aucs[step], aucs[0.01], strict=True):
                    ok = np.isfinite(ref)
                    errors[step] += np.abs(got[ok] - ref[ok]).tolist()
        print(f"{name}: done", file=sys.stderr)
    print("| step | forwards per curve | worst abs AUC error | mean abs AUC error | curves |")
    print("|---|---|---|---|---|")
    for step in STEPS[1:]:
        e = np.array(errors[step])
        print(f"| {step} | {round(1 / step) + 1} | {e.max():.4f} | {e.mean():.4f} | {len(e)} |")


if __name__ == "__main__":
    main()

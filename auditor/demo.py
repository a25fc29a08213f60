"""``auditor demo``: the tank that learned the weather, end to end on a CPU in about a minute.

Synthetic scenes (a tank = disc, a truck = square, on grass/gravel/brick) under a sky whose weather gives the
class away in the training set (tanks sunny, trucks cloudy); a small CNN is trained on them. The audit set
has the same objects with the weather drawn independently of the class, exact masks and a ``weather``
metadata column, so the audit can show what the model learned.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from auditor.config import load_config
from auditor.run.local import run_audit
from auditor.store.schema import Summary
from auditor.synthetic import write_dataset

log = logging.getLogger(__name__)

NAMES = ("tank", "truck")
MEAN, STD = [0.45, 0.45, 0.45], [0.25, 0.25, 0.25]


class DemoNet(nn.Module):
    """Three conv blocks, global average pooling, one Linear layer (so CAM applies too)."""

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 2 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build(num_classes: int = 2, width: int = 16) -> nn.Module:
    """Factory used by the demo's config (``model.factory: auditor.demo:build``)."""
    return DemoNet(num_classes, width)


def _load(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(csv.DictReader((root / "audit.csv").open()))
    x = np.stack([np.asarray(Image.open(root / r["path"]).convert("RGB"), np.float32) / 255 for r in rows])
    t = (torch.from_numpy(x).permute(0, 3, 1, 2) - MEAN[0]) / STD[0]
    y = torch.tensor([NAMES.index(r["label"]) for r in rows])
    return t, y


def train(root: Path, steps: int = 250, seed: int = 0) -> nn.Module:
    """Train :class:`DemoNet` on the scenes under ``root`` (Adam, batches of 64)."""
    x, y = _load(root)
    torch.manual_seed(seed)
    model = DemoNet(len(NAMES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def run_demo(out: Path, *, n_train: int = 200, n_audit: int = 100, size: int = 64, seed: int = 0) -> Summary:
    """Build the data, train the model, audit it into ``out`` and return the summary."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_dataset(data / "train", n_train, size=size, seed=seed, weather_bias=1.0, labels=NAMES)
    write_dataset(data / "audit", n_audit, size=size, seed=seed + 1, weather_bias=0.5, labels=NAMES)
    model = train(data / "train", seed=seed)
    torch.save(model.state_dict(), data / "model.pt")
    log.info("data and model ready in %.0f s", time.perf_counter() - start)
    cfg = {
        "model": {"factory": "auditor.demo:build", "checkpoint": "data/model.pt"},
        "data": {
            "manifest": "data/audit/audit.csv",
            "classes": list(NAMES),
            "image_size": size,
            "normalize": {"mean": MEAN, "std": STD},
            "metadata": ["weather"],
        },
        "methods": "fast",
        "metrics": "fast",
        "expensive": {"per_class": 30},
        "sanity": {"methods": ["grad_cam", "layer_cam"], "n_images": 16, "n_blocks": 2},
        "batch_size": 50,
        "seed": seed,
    }
    (out / "audit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_audit(load_config(out / "audit.yaml"), out / "run", force=True, progress=False)

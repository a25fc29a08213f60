"""Real files on disk: a generated dataset (PNG images, masks, CSV with metadata) and a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from auditor.synthetic import write_dataset
from tests.pipeline.tinynet import TinyNet

TINYNET = Path(__file__).with_name("tinynet.py")


def _train(root: Path, steps: int = 40) -> dict[str, torch.Tensor]:
    import csv

    rows = list(csv.DictReader((root / "audit.csv").open()))
    x = torch.tensor(np.stack([np.asarray(Image.open(root / r["path"]), np.float32) / 255 for r in rows]))
    x = (x.permute(0, 3, 1, 2) - 0.45) / 0.25
    y = torch.tensor([0 if r["label"] == "disc" else 1 for r in rows])
    torch.manual_seed(0)
    model = TinyNet(2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, 12, size=32, seed=0, weather_bias=0.9)
    state = _train(root)
    # saved the way DataParallel + a training loop would: a wrapper dict and a "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, root / "model.pt")
    return root


def make_config(root: Path, tmp: Path, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": {"factory": f"{TINYNET}:build", "checkpoint": str(root / "model.pt")},
        "data": {
            "manifest": str(root / "audit.csv"),
            "image_size": 32,
            "normalize": {"mean": [0.45] * 3, "std": [0.25] * 3},
        },
        "methods": ["grad_cam", "hires_cam", "occlusion"],
        "method_options": {"occlusion": {"window": 8, "stride": 8}},
        "metrics": "fast",
        "metric_options": {"deletion_auc": {"step": 0.1}, "insertion_auc": {"step": 0.1}},
        "expensive": {"per_class": 3},
        "batch_size": 5,
        # fixed, not auto: runs compared bit for bit must not depend on a timing; and NHWC is the path to test
        "memory_format": "channels_last",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_after_parts(command: list[str], parts: Path, count: int) -> None:
    """Start ``command`` and SIGKILL it once ``parts`` holds ``count`` committed parts (or it ends)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(parts.glob("part-*.parquet"))) >= count:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()

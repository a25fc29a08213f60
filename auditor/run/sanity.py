"""Run-level sanity checks: the model-parameter randomization test on a stratified sample, and the agreement
between methods' maps over the whole run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from auditor.cams import CAMS
from auditor.io.sources import stratified_subset
from auditor.metrics.sanity import method_agreement, mprt
from auditor.run.setup import BLACK_BOX, Plan
from auditor.stats import describe
from auditor.store.rundir import RunDir


def run_mprt(plan: Plan, first: pd.DataFrame) -> dict[str, Any]:
    """``summary.sanity.mprt`` on ``sanity.n_images`` images, stratified by class.

    Args:
        plan: the run.
        first: one row per audited sample (``row``).
    """
    cfg = plan.cfg.sanity
    assert cfg is not None
    methods = [m for m in cfg.methods if CAMS[m].needs != "nothing" or m in BLACK_BOX]
    labels = first["row"].map(lambda r: plan.samples[int(r)].label).to_numpy()
    per_class = max(1, math.ceil(cfg.n_images / len(plan.classes)))
    ids = [plan.samples[int(r)].id for r in first["row"]]
    keep = stratified_subset(ids, labels, per_class, plan.cfg.seed, "mprt")
    chosen = first["row"].to_numpy()[keep][: cfg.n_images]
    items = [it for it in (plan.dataset.load(int(r)) for r in chosen) if it["ok"]]  # no partner needed
    images = torch.stack([it["image"] for it in items]).to(plan.device)
    targets = torch.tensor([plan.samples[int(r)].label for r in chosen[: len(items)]], device=plan.device)
    res = mprt(
        plan.loaded.module,
        images,
        targets,
        methods,
        layer=plan.layer,
        n_blocks=cfg.n_blocks,
        seed=plan.cfg.seed,
        batch_size=plan.chunk,
        options={m: plan.cfg.method_options.get(m, {}) for m in methods},
    )
    return {
        "n_images": len(items),
        "randomized_blocks": res.blocks,
        "methods": {
            m: {"spearman": res.spearman[m], "ssim": res.ssim[m], "unreliable": res.unreliable[m]} for m in methods
        },
    }


def agreement(rundir: RunDir, table: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    """Mean per-sample Spearman between the maps of every pair of class-sensitive methods, per class."""
    names = [m for m in methods if CAMS[m].class_sensitive and rundir.has_maps(m, "label")]
    if len(names) < 2:
        return {}
    first = table[(table["method"] == names[0]) & (table["target"] == "label")]
    rows, labels = first["row"].to_numpy(), first["label"].to_numpy()
    arrays = {m: arr for m in names if (arr := rundir.load_maps(m, "label")) is not None}
    sums: dict[str, dict[str, list[float]]] = {}
    for start in range(0, len(rows), 256):
        r = rows[start : start + 256]
        maps = {m: torch.from_numpy(np.asarray(a[r], dtype=np.float32)).nan_to_num(0.0) for m, a in arrays.items()}
        for (a, b), rho in method_agreement(maps, size=16).items():
            for cls, value in zip(labels[start : start + 256], rho, strict=True):
                for key in ("*", str(cls)):
                    sums.setdefault(key, {}).setdefault(f"{a}|{b}", []).append(float(value))
    return {
        cls: {pair: describe(np.array(v), resamples=200) for pair, v in pairs.items()} for cls, pairs in sums.items()
    }

"""Shortcut detection over a whole dataset: analyses (numbers) and flags (verdicts with evidence)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor, nn

from auditor.cams import CAMS
from auditor.shortcuts.analyses import (
    attribute_leakage,
    background_reliance,
    class_hotspots,
    counterfactual_summary,
    grid_maps,
    spectral_clusters,
)
from auditor.shortcuts.flags import (
    Thresholds,
    attribute_flags,
    background_flags,
    cluster_flags,
    counterfactual_flags,
    hotspot_flags,
    order_flags,
    unreliable_flags,
)
from auditor.shortcuts.interventions import hotspot_intervention

__all__ = ["Intervener", "Thresholds", "analyze"]

CLUSTER_CAP = 400  # maps per class clustered (seeded choice); the eigen-decomposition is O(n^3)


@dataclass
class Intervener:
    """What the hotspot interventions need: the model and a way to reload images by row."""

    model: nn.Module
    load: Callable[[Sequence[int]], Tensor]
    to_pixels: Callable[[Tensor], Tensor]
    from_pixels: Callable[[Tensor], Tensor]


def map_methods(methods: Sequence[str], root: Path, target: str = "label") -> list[str]:
    """Methods whose maps support claims: class-sensitive, not pixel-space (guided) methods."""
    return [
        m
        for m in methods
        if CAMS[m].class_sensitive and CAMS[m].family != "pixel" and (root / "maps" / f"{m}__{target}.npy").exists()
    ]


def _clusters(sub: pd.DataFrame, grids: np.ndarray, classes: Sequence[str], method: str, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    ok = np.isfinite(grids).all(axis=(1, 2))
    for cls in classes:
        idx = np.flatnonzero(ok & (sub["label"].to_numpy() == cls))
        if len(idx) < 6:
            continue
        if len(idx) > CLUSTER_CAP:
            idx = np.sort(rng.choice(idx, CLUSTER_CAP, replace=False))
        res = spectral_clusters(grids[idx], seed=seed)
        labels = np.asarray(res["labels"])
        has_ratio = {"energy_in_mask", "energy_in_mask_chance"} <= set(sub.columns)
        ratio = (sub["energy_in_mask"] / sub["energy_in_mask_chance"]).to_numpy(np.float64) if has_ratio else None
        clusters = []
        for k in range(res["k"]):
            members = idx[labels == k]
            entry: dict[str, Any] = {
                "cluster": k,
                "size": len(members),
                "share": float(len(members) / len(idx)),
                "prototype_ids": sub["id"].to_numpy()[idx[res["prototypes"][k]]].tolist(),
                "mean_map": np.round(grids[members].mean(0), 6).tolist(),
            }
            if ratio is not None:
                r = ratio[members]
                entry["median_ratio"] = float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")
            clusters.append(entry)
        med = float(np.nanmedian(ratio[idx])) if ratio is not None and np.isfinite(ratio[idx]).any() else float("nan")
        out[cls] = {
            "method": method,
            "k": res["k"],
            "eigenvalues": res["eigenvalues"],
            "n": len(idx),
            "median_ratio": med,
            "clusters": clusters,
        }
    return out


def analyze(
    table: pd.DataFrame,
    root: Path,
    classes: Sequence[str],
    metadata: Sequence[str],
    methods: Sequence[str],
    thresholds: Thresholds,
    mprt: dict[str, Any] | None,
    intervener: Intervener | None,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every dataset-level analysis on a finished pass and decide the flags.

    Args:
        table: ``samples.parquet``.
        root: the run directory (``maps/``).
        classes: class names in model order.
        metadata: metadata columns.
        methods: the run's methods.
        thresholds: flag thresholds.
        mprt: ``summary.sanity.mprt`` (method reliability), or None.
        intervener: model access for hotspot interventions (None: hotspots stay unconfirmed).
        seed: seed of bootstraps, clustering and imputation noise.

    Returns:
        ``(analyses, flags)`` for ``summary.json`` and ``flags.json``.
    """
    # The explained class is the label unless the run only explained predictions (target: prediction).
    target = "label" if (table["target"] == "label").any() else str(table["target"].iloc[0])
    label_rows = table[table["target"] == target]
    first = label_rows[label_rows["method"] == label_rows["method"].iloc[0]]
    unreliable = {m for m, r in (mprt or {}).get("methods", {}).items() if r["unreliable"]}
    chosen = map_methods(methods, root, target)
    objects_path = root / "maps" / "_object.npy"
    objects = np.load(objects_path, mmap_mode="r") if objects_path.exists() else None
    background: dict[str, Any] = {}
    hotspots: dict[str, Any] = {}
    grids_by_method: dict[str, tuple[pd.DataFrame, np.ndarray]] = {}
    for m in chosen:
        sub = label_rows[label_rows["method"] == m]
        background[m] = background_reliance(sub, classes, seed)
        rows = sub["row"].to_numpy()
        grids = grid_maps(np.load(root / "maps" / f"{m}__{target}.npy", mmap_mode="r")[rows])
        obj = np.asarray(objects[rows], dtype=np.float64) if objects is not None else None
        hotspots[m] = class_hotspots(grids, sub["label"].to_numpy(), classes, obj)
        grids_by_method[m] = (sub, grids)
    interventions: dict[str, Any] = {}
    if intervener is not None:
        rng = np.random.default_rng(seed)
        candidates = hotspot_flags(hotspots, {}, thresholds, unreliable)
        for flag in candidates:
            cls = flag["class"]
            own = first[first["label"] == cls]["row"].to_numpy()
            other = first[first["label"] != cls]["row"].to_numpy()
            n = thresholds.intervention_images
            own = np.sort(rng.choice(own, min(n, len(own)), replace=False))
            other = np.sort(rng.choice(other, min(n, len(other)), replace=False))
            interventions[cls] = {
                "region": flag["region"],
                **hotspot_intervention(
                    intervener.model,
                    intervener.load,
                    own.tolist(),
                    other.tolist(),
                    list(classes).index(cls),
                    flag["region"],
                    to_pixels=intervener.to_pixels,
                    from_pixels=intervener.from_pixels,
                    seed=seed,
                ),
            }
    attributes = attribute_leakage(first, metadata, classes, thresholds.min_group)
    counterfactual = counterfactual_summary(first, classes)
    clusters = _clusters(*grids_by_method[chosen[0]], classes, chosen[0], seed) if chosen else {}
    flags = (
        background_flags(background, thresholds, unreliable)
        + hotspot_flags(hotspots, interventions, thresholds, unreliable)
        + attribute_flags(attributes, thresholds)
        + counterfactual_flags(counterfactual, thresholds)
        + cluster_flags(clusters, thresholds)
        + unreliable_flags(mprt)
    )
    for per_class in hotspots.values():
        for r in per_class.values():
            r["diff"] = np.round(np.asarray(r["diff"]), 7).tolist()
            r.pop("rows", None)
    analyses = {
        "target": target,
        "methods": chosen,
        "background": background,
        "hotspots": hotspots,
        "interventions": interventions,
        "attributes": attributes,
        "counterfactual": counterfactual,
        "clusters": clusters,
    }
    return analyses, order_flags(flags)

"""Dataset-level numbers of a finished pass: per-class metric aggregates, accuracy, metadata groups, dataset info.

Pure functions of ``samples.parquet`` (and the curves for MaxBoxAccV2); no model, no torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from auditor.metrics.localization import max_box_acc
from auditor.stats import NAN, bootstrap_ci, describe
from auditor.store.rundir import RunDir
from auditor.store.schema import DatasetInfo


def _max_box_acc_stats(curves: np.ndarray, seed: int, resamples: int = 200) -> dict[str, float]:
    curves = curves[~np.isnan(curves).any(1)]
    if len(curves) == 0:
        return {"mean": NAN, "median": NAN, "ci_low": NAN, "ci_high": NAN, "n": 0}
    low, high = bootstrap_ci(
        curves, statistic=lambda r: np.array([max_box_acc(c) for c in r]), resamples=resamples, seed=seed
    )
    return {"mean": max_box_acc(curves), "median": NAN, "ci_low": low, "ci_high": high, "n": len(curves)}


def aggregates(
    table: pd.DataFrame, rundir: RunDir, classes: list[str], columns: list[str], seed: int
) -> dict[str, Any]:
    """``aggregates[method][target][class][metric] = {mean, median, ci_low, ci_high, n}`` (class ``*`` = all).

    Args:
        table: ``samples.parquet``.
        rundir: the run (``box_iou_curve`` curves give ``max_box_acc``).
        classes: class names.
        columns: the metric columns (from the metric registry), in any order; the table's order is kept.
        seed: bootstrap seed.
    """
    wanted = set(columns)
    metric_cols = [c for c in table.columns if c in wanted]
    out: dict[str, Any] = {}
    for (method, target), group in table.groupby(["method", "target"], sort=False):
        curves = rundir.load_curves("box_iou_curve", str(method), str(target))
        per_class: dict[str, Any] = {}
        for cls in ["*", *classes]:
            sub = group if cls == "*" else group[group["label"] == cls]
            if not len(sub):
                continue
            stats = {c: describe(sub[c].to_numpy(), seed=seed) for c in metric_cols if sub[c].notna().any()}
            stats["map_valid_rate"] = {"mean": float(sub["map_valid"].mean()), "n": len(sub)}
            if curves is not None:
                stats["max_box_acc"] = _max_box_acc_stats(np.asarray(curves[sub["row"].to_numpy()], np.float64), seed)
            per_class[cls] = stats
        out.setdefault(str(method), {})[str(target)] = per_class
    return out


def accuracy(first: pd.DataFrame, classes: list[str], seed: int) -> dict[str, Any]:
    """``{class: {accuracy, ci_low, ci_high, n}}`` with class ``*`` = all samples."""
    out: dict[str, Any] = {}
    for cls in ["*", *classes]:
        sub = first if cls == "*" else first[first["label"] == cls]
        if len(sub):
            v = sub["correct"].to_numpy(np.float64)
            low, high = bootstrap_ci(v, seed=seed)
            out[cls] = {"accuracy": float(v.mean()), "ci_low": low, "ci_high": high, "n": len(sub)}
    return out


def groups(first: pd.DataFrame, metadata: list[str]) -> dict[str, Any]:
    """``groups[attribute][value] = {n, accuracy, per_class}``."""
    out: dict[str, Any] = {}
    for attr in metadata:
        if attr not in first.columns:
            continue
        per_value = {}
        for value, sub in first.groupby(attr, sort=True):
            per_value[str(value)] = {
                "n": len(sub),
                "accuracy": float(sub["correct"].mean()),
                "per_class": {str(k): int(v) for k, v in sub["label"].value_counts().sort_index().items()},
            }
        out[attr] = per_value
    return out


WARNING_KINDS = {  # message fragment -> category of dataset.warning_counts (first match wins)
    "empty mask": "empty mask",
    "unusable": "mask unusable",
    "distinct values": "multi-valued mask",
    "covers the whole image": "full-image mask",
    "outside": "outside",
    "clipped": "clipped",
    "size": "size",
}
SKIP_KINDS = {  # reason fragment -> category of dataset.skip_counts (first match wins)
    "not a regular file": "not a regular file",
    "megapixels": "too large",
    "too large": "too large",
    "cannot read": "unreadable",
    "non-finite": "non-finite model output",
    "corrupt": "corrupt",
}


def _kind(text: str, kinds: dict[str, str]) -> str:
    return next((kind for fragment, kind in kinds.items() if fragment in text), "other")


def warning_kind(warning: str) -> str:
    """A stable category of a per-sample warning, for ``dataset.warning_counts``."""
    return _kind(warning, WARNING_KINDS)


def skip_kind(reason: str) -> str:
    """A stable category of a skip reason, for ``dataset.skip_counts``."""
    return _kind(reason, SKIP_KINDS)


def dataset_info(
    first: pd.DataFrame, events: list[dict[str, Any]], classes: list[str], n_requested: int
) -> DatasetInfo:
    """``summary.dataset``: counts, skipped files, warnings and ``id`` (hash of the sorted (id, sha1) pairs)."""
    skipped = [e for ev in events for e in ev["skipped"]]
    warnings = [e for ev in events for e in ev["warnings"]]
    kinds = Counter(warning_kind(w["warning"]) for w in warnings)
    ids = sorted(zip(first["id"], first["sha1"], strict=True))
    return {
        "n": len(first),
        "n_requested": n_requested,
        "classes": classes,
        "per_class": {c: int((first["label"] == c).sum()) for c in classes},
        "with_mask": int((first["mask_source"] != "none").sum()),
        "skipped": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
        "skip_counts": dict(sorted(Counter(skip_kind(s["reason"]) for s in skipped).items())),
        "warning_counts": dict(sorted(kinds.items())),
        "warnings": warnings[:1000],
        "id": hashlib.sha256("\n".join(f"{i}\0{h}" for i, h in ids).encode()).hexdigest(),
    }

"""Dataset-level analyses: numbers only. Turning them into verdicts is :mod:`auditor.shortcuts.flags`.

Every analysis reads what the streaming pass saved (``samples.parquet`` columns, ``maps/*.npy``) and
returns JSON-ready dictionaries with the evidence a flag needs (effect sizes, confidence intervals,
p-values, sample ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from auditor.shortcuts.probes import GRID, PROPERTIES

NAN = float("nan")


def bh_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    vals = np.empty(m)
    vals[order] = q
    out[ok] = vals
    return out


def _median_ci(v: np.ndarray, seed: int, resamples: int = 1000) -> tuple[float, float]:
    if v.size < 2:
        return (float(v[0]), float(v[0])) if v.size else (NAN, NAN)
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, (resamples, v.size))], axis=1)
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


# ------------------------------------------------------------------------------------------ 1. background


def background_reliance(table: pd.DataFrame, classes: Sequence[str], seed: int = 0, worst: int = 6) -> dict[str, Any]:
    """Per class: how the map's mass on the object compares with a uniform map's (its chance level).

    ``ratio = energy_in_mask / a`` (``a`` = object area fraction): 1 = what a uniform map gives, < 1 = the
    map prefers the background, > 1 = it prefers the object (a clean model, even with blurry CAMs).

    Args:
        table: rows of one method and the ``label`` target, with ``energy_in_mask`` and its chance.
        classes: class names.
        seed: bootstrap seed.
        worst: how many worst-offending sample ids to keep.

    Returns:
        ``{class: {n, median_ratio, ci_low, ci_high, p_value, outside, chance_outside, worst_ids, worst_values}}``
        where ``p_value`` is a one-sided Wilcoxon signed-rank test of ``ratio < 1``.
    """
    out: dict[str, Any] = {}
    if not {"energy_in_mask", "energy_in_mask_chance"} <= set(table.columns):
        return out  # no masks or boxes anywhere in the run
    for cls in classes:
        sub = table[(table["label"] == cls) & table["energy_in_mask"].notna()]
        sub = sub[sub["energy_in_mask_chance"] > 0]
        if len(sub) < 3:
            continue
        ratio = (sub["energy_in_mask"] / sub["energy_in_mask_chance"]).to_numpy(np.float64)
        low, high = _median_ci(ratio, seed)
        diff = ratio - 1
        p = float(stats.wilcoxon(diff, alternative="less").pvalue) if np.any(diff != 0) else 1.0
        order = np.argsort(ratio)[:worst]
        out[cls] = {
            "n": len(sub),
            "median_ratio": float(np.median(ratio)),
            "ci_low": low,
            "ci_high": high,
            "p_value": p,
            "outside": float(sub["energy_outside_mask"].median()) if "energy_outside_mask" in sub else NAN,
            "chance_outside": float((1 - sub["energy_in_mask_chance"]).median()),
            "worst_ids": sub["id"].to_numpy()[order].tolist(),
            "worst_values": ratio[order].tolist(),
        }
    return out


# ------------------------------------------------------------------------------------------ 2. hotspots


def grid_maps(maps: np.ndarray) -> np.ndarray:
    """``[n, h, w]`` raw maps -> ``[n, 32, 32]`` float32 L1-normalized (rows with no mass or NaN become NaN)."""
    t = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    bad = ~torch.isfinite(t).flatten(1).all(1)
    t = torch.nan_to_num(t, nan=0.0).clamp_min(0)
    g = F.interpolate(t[:, None], size=(GRID, GRID), mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    mass = g.flatten(1).sum(1)
    g = g / mass.clamp_min(1e-12).view(-1, 1, 1)
    g[bad | (mass <= 0)] = float("nan")
    return g.numpy()  # float32: 4 KiB per sample


def _region(diff: np.ndarray, level: float) -> np.ndarray:
    """The 4-connected cells with ``diff >= level * max`` around the peak (``[32, 32]`` bool)."""
    from scipy import ndimage

    peak = np.unravel_index(np.nanargmax(diff), diff.shape)
    labels, _ = ndimage.label(diff >= level * diff[peak])
    return np.asarray(labels == labels[peak])


def describe_location(box: Sequence[float]) -> str:
    """Plain words for a normalized box: 'the top-left corner', 'the bottom edge', 'the centre'."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if v and h:
        return f"the {v}-{h} corner"
    if v or h:
        return f"the {v or h} edge"
    return "the centre"


def class_hotspots(
    maps: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    objects: np.ndarray | None = None,
    level: float = 0.5,
) -> dict[str, Any]:
    """Per class: where its mean L1-normalized map exceeds the other classes' mean, on a 32 x 32 grid.

    Args:
        maps: ``[n, 32, 32]`` L1-normalized maps (:func:`grid_maps`; NaN rows are ignored).
        labels: ``[n]`` class names.
        classes: class names.
        objects: ``[n, 32, 32]`` object fraction per cell (NaN rows = no mask), or None.
        level: the region is the connected set of cells within ``level`` of the peak difference.

    Returns:
        ``{class: {region [x0, y0, x1, y1] in [0, 1], area (of the box), location, lift, persistence, p_value,
        object_overlap, class_mass, other_mass, peak_ids}}``; ``lift`` = the class's mean mass in the region
        over the other classes'; ``persistence`` = share of the class's maps with more than twice the
        other classes' mean mass there; ``concentration`` = the class's mean mass in the region over the
        region's share of the grid (1 = a uniform map); ``p_value`` = one-sided Mann-Whitney U (class > others).
    """
    out: dict[str, Any] = {}
    ok = np.isfinite(maps).all(axis=(1, 2))
    for cls in classes:
        own, rest = ok & (labels == cls), ok & (labels != cls)
        if own.sum() < 3 or rest.sum() < 3:
            continue
        diff = maps[own].mean(0) - maps[rest].mean(0)
        if not np.isfinite(diff).any() or np.nanmax(diff) <= 0:
            continue
        region = _region(diff, level)
        ys, xs = np.nonzero(region)
        box = [xs.min() / GRID, ys.min() / GRID, (xs.max() + 1) / GRID, (ys.max() + 1) / GRID]
        m_own = maps[own][:, region].sum(1)
        m_rest = maps[rest][:, region].sum(1)
        base = float(m_rest.mean())
        overlap = NAN
        if objects is not None:
            obj = objects[own]
            has = np.isfinite(obj).all(axis=(1, 2))
            if has.any():
                overlap = float(obj[has][:, region].mean())
        out[cls] = {
            "region": [float(v) for v in box],
            "area": float((box[2] - box[0]) * (box[3] - box[1])),  # of the bounding box: artefacts are compact
            "location": describe_location(box),
            "lift": float(m_own.mean() / max(base, 1e-12)),
            "concentration": float(m_own.mean() / region.mean()),
            "persistence": float((m_own > 2 * base).mean()),
            "p_value": float(stats.mannwhitneyu(m_own, m_rest, alternative="greater").pvalue),
            "object_overlap": overlap,
            "class_mass": float(m_own.mean()),
            "other_mass": base,
            "rows": np.flatnonzero(own)[np.argsort(-m_own)[:6]].tolist(),
            "diff": diff.tolist(),
        }
    return out


# ------------------------------------------------------------------------------------------ 3. attributes


def _purity(values: np.ndarray, target: np.ndarray) -> float:
    """How well ``values`` alone predict ``target``: accuracy of the majority-per-value rule, rescaled so
    the overall majority rate is 0 and perfect prediction is 1."""
    frame = pd.DataFrame({"v": values, "t": target})
    if frame.empty:
        return NAN
    rule = frame.groupby("v")["t"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(frame)
    base = frame["t"].value_counts().iloc[0] / len(frame)
    return float((rule - base) / (1 - base)) if base < 1 else 0.0


def property_bins(values: np.ndarray) -> np.ndarray:
    """Quartile bins of a continuous property as readable labels (``'<= 0.31'``, ``'0.31-0.45'``, ``'> 0.58'``)."""
    edges = np.unique(np.quantile(values, [0.25, 0.5, 0.75]))
    idx = np.digitize(values, edges, right=True)
    names = []
    for i in range(len(edges) + 1):
        if i == 0:
            names.append(f"<= {edges[0]:.3g}")
        elif i == len(edges):
            names.append(f"> {edges[-1]:.3g}")
        else:
            names.append(f"{edges[i - 1]:.3g}-{edges[i]:.3g}")
    return np.array([names[i] for i in idx], dtype=object)


def attribute_leakage(
    first: pd.DataFrame, attributes: Sequence[str], classes: Sequence[str], min_group: int = 5
) -> dict[str, Any]:
    """Per attribute: group accuracies, worst-group accuracy, and how well it predicts label and prediction.

    Attributes are the metadata columns; without metadata the image properties (``prop_*`` columns:
    brightness, contrast, mean colour, sharpness, binned in quartiles) are used instead.

    Args:
        first: one row per sample (one method, ``label`` target) with ``label``, ``pred``, ``correct``.
        attributes: metadata column names.
        classes: class names.
        min_group: smallest (class, value) group that is tested.

    Returns:
        ``{attribute: {kind, values, groups, worst_group_accuracy, average_accuracy, gap, predicts_label,
        predicts_prediction, tests: [{class, value, n, accuracy, rest_accuracy, gap, p_value}]}}``; each test
        is a one-sided Fisher exact test that the group is less accurate than the rest of its class.
    """
    cols = [(a, "metadata", first[a].astype(str).to_numpy()) for a in attributes if a in first.columns]
    if not cols:
        cols = [
            (p, "property", property_bins(first[f"prop_{p}"].to_numpy(np.float64)))
            for p in PROPERTIES
            if f"prop_{p}" in first.columns and first[f"prop_{p}"].notna().all()
        ]
    labels = first["label"].to_numpy()
    correct = first["correct"].to_numpy(bool)
    preds = first["pred"].to_numpy()
    outside = first["energy_outside_mask"].to_numpy(np.float64) if "energy_outside_mask" in first else None
    out: dict[str, Any] = {}
    for name, kind, values in cols:
        groups = []
        tests = []
        for cls in classes:
            in_cls = labels == cls
            for v in np.unique(values[in_cls]):
                g = in_cls & (values == v)
                rest = in_cls & (values != v)
                entry: dict[str, Any] = {
                    "class": cls,
                    "value": str(v),
                    "n": int(g.sum()),
                    "accuracy": float(correct[g].mean()),
                }
                if outside is not None and np.isfinite(outside[g]).any():
                    entry["outside"] = float(np.nanmean(outside[g]))
                groups.append(entry)
                if g.sum() >= min_group and rest.sum() >= min_group:
                    table = [
                        [int(correct[g].sum()), int((~correct[g]).sum())],
                        [int(correct[rest].sum()), int((~correct[rest]).sum())],
                    ]
                    p = float(stats.fisher_exact(table, alternative="less").pvalue)
                    tests.append(
                        {
                            "class": cls,
                            "value": str(v),
                            "n": int(g.sum()),
                            "accuracy": float(correct[g].mean()),
                            "rest_accuracy": float(correct[rest].mean()),
                            "gap": float(correct[rest].mean() - correct[g].mean()),
                            "p_value": p,
                            "ids": first["id"].to_numpy()[g & ~correct][:6].tolist(),
                        }
                    )
        big = [g for g in groups if g["n"] >= min_group]
        wga = min((g["accuracy"] for g in big), default=NAN)
        out[name] = {
            "kind": kind,
            "values": {
                str(v): {"n": int((values == v).sum()), "accuracy": float(correct[values == v].mean())}
                for v in np.unique(values)
            },
            "groups": groups,
            "worst_group_accuracy": wga,
            "average_accuracy": float(correct.mean()),
            "gap": float(correct.mean() - wga) if np.isfinite(wga) else NAN,
            "predicts_label": _purity(values, labels),
            "predicts_prediction": _purity(values, preds),
            "tests": tests,
        }
    return out


# ------------------------------------------------------------------------------------------ 4. counterfactuals


def counterfactual_summary(first: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Per class: predictions on foreground-only, background-only and background-swapped images.

    ``bg_only_self`` = share of the class's background-only images still predicted as the class;
    ``bg_only_other`` = share of the other classes' background-only images predicted as this class (what
    an uninformative background gets); their difference is direct evidence that the background is used.
    ``mixed_accuracy`` = the class's objects on another class's background, recognised; ``bg_gap`` =
    original accuracy minus that.

    Returns:
        ``{class: {n, accuracy, fg_only_accuracy, bg_only_self, bg_only_other, mixed_accuracy, mixed_follows_bg,
        bg_gap, p_value, ids}}``; ``p_value``: one-sided Fisher exact test ``bg_only_self > bg_only_other``.
    """
    if "cf_bg_pred" not in first.columns:
        return {}
    rows = first[first["cf_bg_pred"] != ""]
    out: dict[str, Any] = {}
    for cls in classes:
        own, other = rows[rows["label"] == cls], rows[rows["label"] != cls]
        if len(own) < 3 or len(other) < 3:
            continue
        self_hits = int((own["cf_bg_pred"] == cls).sum())
        other_hits = int((other["cf_bg_pred"] == cls).sum())
        mixed = own[own["cf_mix_pred"] != ""]
        p = float(
            stats.fisher_exact(
                [[self_hits, len(own) - self_hits], [other_hits, len(other) - other_hits]], alternative="greater"
            ).pvalue
        )
        acc = float(own["correct"].mean())
        mixed_acc = float((mixed["cf_mix_pred"] == cls).mean()) if len(mixed) else NAN
        out[cls] = {
            "n": len(own),
            "accuracy": acc,
            "fg_only_accuracy": float((own["cf_fg_pred"] == cls).mean()),
            "bg_only_self": self_hits / len(own),
            "bg_only_other": other_hits / len(other),
            "mixed_accuracy": mixed_acc,
            "mixed_follows_bg": float((mixed["cf_mix_pred"] == mixed["cf_mix_bg_label"]).mean()) if len(mixed) else NAN,
            "bg_gap": acc - mixed_acc if len(mixed) else NAN,
            "p_value": p,
            "ids": own[own["cf_bg_pred"] == cls]["id"].head(6).tolist(),
        }
    return out


# ------------------------------------------------------------------------------------------ 5. clusters


def spectral_clusters(maps: np.ndarray, k_neighbors: int = 10, max_k: int = 10, seed: int = 0) -> dict[str, Any]:
    """SpRAy-style clustering of one class's maps (CoRelAy defaults, eigengap choice of k).

    Euclidean distances between L1-normalized 32 x 32 maps -> symmetric binary kNN graph -> normalized
    affinity ``D^-1/2 A D^-1/2`` -> its leading eigenvectors; ``k`` = the largest gap among the leading
    eigenvalues (``k <= max_k``); KMeans on the row-normalized spectral embedding.

    Args:
        maps: ``[n, 32, 32]`` finite maps of one class.

    Returns:
        ``{k, eigenvalues, labels [n], prototypes {cluster: [indices]}, sizes}``.
    """
    from scipy.spatial.distance import cdist
    from sklearn.cluster import KMeans

    n = maps.shape[0]
    x = maps.reshape(n, -1)
    if n < 6:
        return {"k": 1, "eigenvalues": [], "labels": [0] * n, "prototypes": {0: list(range(min(3, n)))}, "sizes": [n]}
    d = cdist(x, x, "sqeuclidean")  # [n, n]; no [n, n, 1024] intermediate
    k = min(k_neighbors, n - 1)
    nn_idx = np.argsort(d, axis=1)[:, 1 : k + 1]
    a = np.zeros((n, n))
    a[np.repeat(np.arange(n), k), nn_idx.ravel()] = 1
    a = (a + a.T) / 2
    deg = a.sum(1)
    dinv = 1 / np.sqrt(np.maximum(deg, 1e-12))
    affinity = dinv[:, None] * a * dinv[None]
    vals, vecs = np.linalg.eigh(affinity)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    top = min(max_k + 1, n)
    gaps = vals[: top - 1] - vals[1:top]
    best = int(np.argmax(gaps)) + 1  # number of leading eigenvalues before the largest gap
    if best <= 1:
        return {
            "k": 1,
            "eigenvalues": vals[:top].tolist(),
            "labels": [0] * n,
            "prototypes": {0: np.argsort(((x - x.mean(0)) ** 2).sum(1))[:3].tolist()},
            "sizes": [n],
        }
    emb = vecs[:, :best]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=best, n_init=10, random_state=seed).fit(emb)
    labels = km.labels_
    protos = {
        int(c): np.argsort(((emb - km.cluster_centers_[c]) ** 2).sum(1) + 1e9 * (labels != c))[:3].tolist()
        for c in range(best)
    }
    return {
        "k": best,
        "eigenvalues": vals[:top].tolist(),
        "labels": labels.tolist(),
        "prototypes": protos,
        "sizes": np.bincount(labels, minlength=best).tolist(),
    }

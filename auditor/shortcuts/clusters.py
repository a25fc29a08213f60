"""``cluster``: a sizeable group of a class's maps that sits off the object while the class as a whole does not.

SpRAy-style spectral clustering of each class's maps on the 32 x 32 grid (Lapuschkin et al. 2019,
arXiv:1902.10178), with the eigengap choice of the number of clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from auditor.io.sources import keyed_order
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, make_flag, pct
from auditor.shortcuts.grids import Indexable, finite_rows
from auditor.shortcuts.registry import Analysis, AnalysisInputs, FlagContext, Measurement, register_analysis
from auditor.shortcuts.thresholds import SharedParams, params_of


class Params(SharedParams):
    """``cluster``'s thresholds (config ``thresholds``, flat keys)."""

    cluster_min_share: float = Field(0.1, gt=0, le=1, description="least share of its class a flagged cluster holds")
    cluster_effect: float = Field(
        0.3, gt=0, description="least gap between a cluster's object share (x chance) and its class's"
    )


CLUSTER_CAP = 400  # maps per class clustered (keyed by sample id); the eigen-decomposition is O(n^3)


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


def _ratio(sub: pd.DataFrame) -> np.ndarray | None:
    if not {"energy_in_mask", "energy_in_mask_chance"} <= set(sub.columns):
        return None
    return (sub["energy_in_mask"] / sub["energy_in_mask_chance"]).to_numpy(np.float64)


def _nanmedian(v: np.ndarray) -> float:
    return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")


def null_low(values: np.ndarray, size: int, seed: int, draws: int = 200, q: float = 5.0) -> float:
    """The ``q``-th percentile of the median of ``size`` values drawn at random (no replacement): how low a
    group's median gets by chance alone, the null a cluster's median must beat."""
    v = values[np.isfinite(values)]
    if size < 1 or len(v) <= size:
        return float("nan")
    rng = np.random.default_rng(seed)
    medians = [np.median(rng.choice(v, size, replace=False)) for _ in range(draws)]
    return float(np.percentile(medians, q))


def _cluster_entries(
    res: dict[str, Any], idx: np.ndarray, sub: pd.DataFrame, grids: Indexable, ratio: np.ndarray | None, seed: int
) -> list[dict[str, Any]]:
    labels = np.asarray(res["labels"])
    clusters = []
    for k in range(res["k"]):
        members = idx[labels == k]
        entry: dict[str, Any] = {
            "cluster": k,
            "size": len(members),
            "share": float(len(members) / len(idx)),
            "prototype_ids": sub["id"].to_numpy()[idx[res["prototypes"][k]]].tolist(),
            # integer percent of the uniform map's value (100 = uniform): 6 decimals were 2 MB at 100 classes
            "mean_map": np.round(np.nan_to_num(grids[members].mean(0)) * grids.shape[1] * grids.shape[2] * 100)
            .astype(int)
            .tolist(),
        }
        if ratio is not None:
            entry["median_ratio"] = _nanmedian(ratio[members])
            entry["null_low"] = null_low(ratio[idx], len(members), seed + k)
        clusters.append(entry)
    return clusters


def class_clusters(
    sub: pd.DataFrame, grids: Indexable, classes: Sequence[str], method: str, seed: int
) -> dict[str, Any]:
    """Per class (at least 6 finite maps; at most ``CLUSTER_CAP``, keyed by sample id): its clusters of maps."""
    out: dict[str, Any] = {}
    ok = finite_rows(grids)
    ratio = _ratio(sub)
    for cls in classes:
        idx = np.flatnonzero(ok & (sub["label"].to_numpy() == cls))
        if len(idx) < 6:
            continue
        if len(idx) > CLUSTER_CAP:
            idx = np.sort(idx[keyed_order(sub["id"].to_numpy()[idx].tolist(), seed, "cluster")[:CLUSTER_CAP]])
        res = spectral_clusters(grids[idx], seed=seed)
        out[cls] = {
            "method": method,
            "k": res["k"],
            "eigenvalues": res["eigenvalues"],
            "n": len(idx),
            "median_ratio": _nanmedian(ratio[idx]) if ratio is not None else float("nan"),
            "clusters": _cluster_entries(res, idx, sub, grids, ratio, seed),
        }
    return out


def measure(inputs: AnalysisInputs) -> Measurement:
    if not inputs.grids:
        return {"clusters": {}}
    method = next(iter(inputs.grids))
    return {"clusters": class_clusters(*inputs.grids[method], inputs.classes, method, inputs.seed)}


def cluster_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``cluster``: a sizeable group of a class's maps that sits off the object while the class does not.

    The group's median object share (x chance) must lie below what a random group of the class of the same
    size reaches by chance (``null_low``, 5th percentile) and below the class's median by ``cluster_effect``.
    """
    t = params_of(ctx.thresholds, Params)
    flags = []
    for c, info in measured["clusters"].items():
        for k in info.get("clusters", []):
            ratio, rest, low = k.get("median_ratio"), info.get("median_ratio"), k.get("null_low", float("nan"))
            if ratio is None or rest is None or not np.isfinite(ratio) or not np.isfinite(rest):
                continue
            beats_null = np.isfinite(low) and ratio < low and rest - ratio >= t.cluster_effect
            if k["share"] >= t.cluster_min_share and k["size"] >= t.min_group and ratio < 1 <= rest and beats_null:
                msg = (
                    f"{k['size']} {c} images ({pct(k['share'])} of the class) form a cluster of explanations "
                    f"that sits off the object (its object share is {ratio:.2f}x chance, the class's "
                    f"{rest:.2f}x): review its prototypes."
                )
                sev = "medium" if ratio < 0.5 else "low"
                score = (1 - ratio) * k["share"] * 2
                evidence = {**k, "method": info["method"]}
                flags.append(
                    make_flag("cluster", c, f"cluster {k['cluster']}", sev, score, msg, evidence, [info["method"]])
                )
    return flags


ANALYSIS = register_analysis(
    Analysis(
        name="clusters",
        params=Params,
        kinds={"cluster": Cause("cluster")},
        needs=frozenset({"maps"}),
        measure=measure,
        flag=cluster_flags,
        evidence_ids=("prototype_ids",),
    )
)

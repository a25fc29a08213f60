"""``concept``: Deep Feature Factorization over the dataset: the concepts a class's attention relies on.

Per class, the target layer's activations of a keyed draw of the class's images are factorized into a few
non-negative concepts (Collins et al. 2018, arXiv:1806.10206; :func:`auditor.ops.factorize`).
For each concept: its share of the class's attention (the class's map mass on the positions the concept
explains), where it lives (its heat off the object, where masks exist), and how specific it is to the class
(its presence in the class's images against its presence in other classes' drawn images, at most 256 of them
in a keyed draw, projected on the same concept embeddings). The report shows each concept's prototype (the
image where it is strongest) with its heat map.

A concept is flagged when it carries a large share of the class's attention, lives off the object, and the
other classes lack it: more specific than a random split of the same images reaches (95th percentile of 200
splits) and at most half as present elsewhere. A background texture shared by every class is not specific;
the class's own object is not off the object; so a clean model's concepts raise nothing. Without masks a
concept cannot be told from the object, so the analysis reports and does not flag. Activation evidence
without an intervention: at most medium.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, StrictInt

from auditor.ops import factorize, project_concepts, resize_bilinear
from auditor.shortcuts.examples import object_removed_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, make_flag, pct
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    keyed_rows,
    register_analysis,
    tracked,
)
from auditor.shortcuts.thresholds import SharedParams, params_of


class Params(SharedParams):
    """``concept``'s thresholds (config ``thresholds``, flat keys)."""

    concept_images: StrictInt = Field(
        16, ge=0, description="images per class whose activations are factorized into concepts (DFF); 0 = off"
    )
    concept_count: StrictInt = Field(4, ge=1, description="concepts fitted per class")
    concept_share: float = Field(
        0.25, gt=0, le=1, description="least share of the class's attention a flagged concept carries (medium: 2x)"
    )
    concept_on_ratio: float = Field(
        0.5, ge=0, lt=1, description="most heat a flagged concept puts on the object, as a multiple of chance"
    )


NULL_DRAWS = 200
OTHERS = 256  # other classes' images a class's concepts are projected on (a keyed draw): the cost per class is
# bounded, so a 1,000-class audit costs 1,000 classes' worth, not 1,000 x 1,000


def other_rows(rows: np.ndarray, labels: np.ndarray, rank: np.ndarray, cls: str, cap: int = OTHERS) -> np.ndarray:
    """The rows of other classes than ``cls`` a class's concepts are compared with: all of them up to ``cap``,
    else the ``cap`` that rank first in a keyed order (``rank``), in the order of ``rows``.

    Args:
        rows: ``[N]`` drawn rows of every class, class after class.
        labels: ``[N]`` their labels.
        rank: ``[N]`` their places in a keyed order (no two equal).
        cls: the class compared.
        cap: most rows returned.
    """
    keep = labels != cls
    if keep.sum() > cap:
        keep &= rank <= np.partition(rank[keep], cap - 1)[cap - 1]
    return rows[keep]


def class_concepts(
    own: np.ndarray,
    other: np.ndarray,
    maps: np.ndarray,
    objects: np.ndarray | None,
    n_components: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Concepts of one class and their numbers.

    Args:
        own: ``[n, K, h, w]`` activations of the class's images.
        other: ``[m, K, h, w]`` activations of other classes' images.
        maps: ``[n, 32, 32]`` the class's L1-normalized maps (NaN rows: no map).
        objects: ``[n, 32, 32]`` object masks on the grid (all-zero rows: no mask), or None.
        n_components: concepts fitted.
        seed: seed of the null's random splits.

    Returns:
        One dict per concept: ``share`` of the class's attention, ``presence`` (mean heat per image) in the
        class and ``presence_other``, ``specificity`` = own / (own + other) with its ``null`` (95th
        percentile over random splits), ``off_object`` (heat share off the object) with ``background_area``
        and ``on_object_ratio`` (heat on the object / the object's area share; NaN without masks),
        ``prototype`` (index into ``own``) and its ``heat`` on the layer grid (thousandths of its maximum).
    """
    n, k, h, w = own.shape
    embeddings, flat, offset = factorize(own.transpose(1, 0, 2, 3).reshape(k, -1), n_components)
    if not np.any(flat > 0):
        return []
    r = flat.shape[0]
    heat = flat.reshape(r, n, h, w)
    heat_other = project_concepts(other.transpose(1, 0, 2, 3).reshape(k, -1), embeddings, offset)
    heat_other = heat_other.reshape(r, other.shape[0], h, w)  # m may be 0 (one class drawn)
    up = np.stack([resize_bilinear(heat[j], (32, 32)) for j in range(r)]).clip(0)  # [r, n, 32, 32]
    total = up.sum(0, keepdims=True)
    assign = np.divide(up, total, out=np.zeros_like(up), where=total > 0)
    has_map = np.isfinite(maps).all(axis=(1, 2))
    has_mask = objects.reshape(n, -1).sum(1) > 0 if objects is not None else np.zeros(n, bool)
    own_presence = heat.mean(axis=(2, 3))  # [r, n]
    other_presence = heat_other.mean(axis=(2, 3))  # [r, m]
    rng = np.random.default_rng(seed)
    out = []
    for j in range(r):
        share = float((assign[j][has_map] * maps[has_map]).sum(axis=(1, 2)).mean()) if has_map.any() else float("nan")
        a, b = float(own_presence[j].mean()), float(other_presence[j].mean()) if other_presence.shape[1] else 0.0
        spec = a / (a + b) if a + b > 0 else float("nan")
        pooled = np.concatenate([own_presence[j], other_presence[j]])
        null = []
        for _ in range(NULL_DRAWS if other_presence.shape[1] else 0):
            perm = rng.permutation(len(pooled))
            ga, gb = pooled[perm[:n]].mean(), pooled[perm[n:]].mean()
            null.append(ga / (ga + gb) if ga + gb > 0 else 0.5)
        off = bg = float("nan")
        if objects is not None and has_mask.any():
            obj = np.asarray(objects, np.float64)[has_mask]
            mass = up[j][has_mask]
            if mass.sum() > 0:
                off = float((mass * (1 - obj)).sum() / mass.sum())
            bg = float((1 - obj).mean())
        proto = int(np.argmax(own_presence[j]))
        out.append(
            {
                "concept": j,
                "share": share,
                "presence": a,
                "presence_other": b,
                "specificity": spec,
                "null": float(np.percentile(null, 95)) if null else float("nan"),
                "off_object": off,
                "background_area": bg,
                "on_object_ratio": (1 - off) / (1 - bg) if bg < 1 else float("nan"),  # a uniform concept: 1
                "prototype": proto,
                "heat": _per_mille(heat[j, proto]),
            }
        )
    return out


def _per_mille(heat: np.ndarray) -> list[list[int]]:
    """``heat`` (``[h, w]`` >= 0) in integer thousandths of its maximum: its shape is what is shown."""
    peak = float(heat.max())
    return np.round(heat / peak * 1000 if peak > 0 else heat * 0).astype(int).tolist()


def measure(inputs: AnalysisInputs) -> Measurement:
    return {}  # concepts need the model's activations: see intervene


def intervene(measured: Measurement, inputs: AnalysisInputs) -> Measurement:
    """Fit concepts per class on the activations of a keyed draw of its images (with the model)."""
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    if not inputs.intervener.has_activations or t.concept_images == 0 or not inputs.methods:
        return {}
    method = inputs.methods[0]
    rows_maps = inputs.grids.get(method)
    if rows_maps is None:
        return {}
    sub, grid = rows_maps
    where = {int(r): i for i, r in enumerate(sub["row"])}
    draws = {
        cls: np.sort(keyed_rows(first[first["label"] == cls], t.concept_images, inputs.seed, "concepts"))
        for cls in inputs.classes
    }
    draws = {c: r for c, r in draws.items() if len(r) >= t.min_group}
    if not draws:
        return {}
    rows = np.concatenate(list(draws.values()))
    labels = np.concatenate([[c] * len(r) for c, r in draws.items()])
    drawn = first[first["row"].isin(rows)]
    order = keyed_rows(drawn, len(drawn), inputs.seed, "concepts-other")
    rank = pd.Series(np.arange(len(order)), index=order)[rows].to_numpy()
    acts = inputs.intervener.activations(rows.tolist())
    at = {int(r): i for i, r in enumerate(rows)}
    objects = inputs.objects
    out: dict[str, Any] = {}
    for cls, own_rows in tracked(draws.items(), "concepts, classes"):
        others = other_rows(rows, labels, rank, cls).tolist()
        maps = np.stack([grid[where[int(r)]] if int(r) in where else np.full((32, 32), np.nan) for r in own_rows])
        obj = np.stack([np.asarray(objects[int(r)]) for r in own_rows]) if objects is not None else None
        concepts = class_concepts(
            acts[[at[int(r)] for r in own_rows]],
            acts[[at[int(r)] for r in others]],
            maps,
            obj,
            t.concept_count,
            inputs.seed,
        )
        ids = first.set_index("row").loc[own_rows, "id"].astype(str).tolist()
        for c in concepts:
            c["prototype_id"] = ids[c.pop("prototype")]
        out[cls] = {"method": method, "n": len(own_rows), "n_other": len(others), "concepts": concepts}
    return {"concepts": out}


def concept_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    t = params_of(ctx.thresholds, Params)
    flags = []
    for cls, info in (measured.get("concepts") or {}).items():
        for c in info["concepts"]:
            off, bg, share, spec = c["off_object"], c["background_area"], c["share"], c["specificity"]
            if not all(np.isfinite(v) for v in (off, bg, share, spec, c["null"], c["on_object_ratio"])):
                continue  # without masks (or without other classes) a concept is reported, not flagged
            lacking = c["presence_other"] <= 0.5 * c["presence"]
            on_ratio = c["on_object_ratio"]
            if share >= t.concept_share and on_ratio <= t.concept_on_ratio and spec > c["null"] and lacking:
                severity = "medium" if share >= 2 * t.concept_share else "low"
                times = c["presence"] / max(c["presence_other"], 1e-12)
                msg = (
                    f"Concept {c['concept']} carries {pct(share)} of {cls}'s attention ({info['method']}), lies "
                    f"{pct(off)} off the object ({on_ratio:.2f}x chance on it) and is {times:.1f}x as present in "
                    f"{cls} images as in other classes' (prototype {c['prototype_id']})"
                )
                evidence = {**c, "method": info["method"], "n": info["n"], "prototype_ids": [c["prototype_id"]]}
                flags.append(
                    make_flag(
                        "concept",
                        cls,
                        f"concept {c['concept']}",
                        severity,
                        share,
                        msg,
                        evidence,
                        [info["method"]],
                    )
                )
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=object_removed_examples,
        name="concepts",
        params=Params,
        kinds={"concept": Cause("background")},
        needs=frozenset({"maps", "model"}),
        measure=measure,
        flag=concept_flags,
        evidence_ids=("prototype_ids",),
        intervene=intervene,
    )
)

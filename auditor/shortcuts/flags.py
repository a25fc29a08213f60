"""Turning analyses into flags: thresholds from the config, evidence attached, severity downgraded when
only methods that failed the randomization test support a finding.

A flag is ``{id, kind, class, attribute, region, severity, score, methods, message, evidence}``
(DESIGN.md §3); ``id = kind/class/attribute`` is stable across runs, so baselines can match flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from auditor.shortcuts.analyses import bh_adjust

SEVERITIES = ("low", "medium", "high")


class Thresholds(BaseModel):
    """Flag thresholds (config key ``thresholds``). Heuristics, documented in the README."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate (Benjamini-Hochberg) of every test")
    min_group: int = Field(5, ge=2, description="smallest group or class tested")
    background_ratio: float = Field(
        1.0,
        gt=0,
        description="flag when the CI of the median mass-on-object / chance ratio lies below this (1 = a uniform map)",
    )
    background_medium: float = 0.8
    background_high: float = 0.5
    hotspot_lift: float = Field(2.0, gt=1, description="class mass in the region / other classes' mass there")
    hotspot_concentration: float = Field(
        2.0, gt=1, description="class mass in the region / the region's share of the image (uniform map: 1)"
    )
    hotspot_max_area: float = Field(0.15, gt=0, le=1, description="largest region (share of the image)")
    hotspot_persistence: float = Field(0.5, gt=0, le=1, description="share of the class's maps hot in the region")
    hotspot_object_overlap: float = Field(0.5, ge=0, le=1, description="regions mostly on the object are not flagged")
    intervention_effect: float = Field(0.05, ge=0, description="least mean probability change that confirms a hotspot")
    intervention_images: int = Field(32, ge=4)
    attribute_gap: float = Field(0.15, gt=0, le=1, description="least accuracy gap of a (class, value) group")
    attribute_medium: float = 0.25
    attribute_high: float = 0.4
    counterfactual_gap: float = Field(0.15, gt=0, le=1, description="least bg-only self - other call-rate gap")
    counterfactual_medium: float = 0.3
    counterfactual_high: float = 0.5
    cluster_min_share: float = Field(0.1, gt=0, le=1)


def _downgrade(severity: str) -> str:
    return SEVERITIES[max(0, SEVERITIES.index(severity) - 1)]


def _change(delta: float, what: str) -> str:
    """``raises p(a) by 0.31`` / ``lowers p(a) by 0.12`` / ``leaves p(a) unchanged`` for a probability change."""
    if abs(delta) < 0.005:
        return f"leaves {what} unchanged"
    return f"{'raises' if delta > 0 else 'lowers'} {what} by {abs(delta):.2f}"


def _flag(
    kind: str,
    cls: str | None,
    attribute: str | None,
    severity: str,
    score: float,
    message: str,
    evidence: dict[str, Any],
    methods: Sequence[str] = (),
    region: Sequence[float] | None = None,
    unreliable: set[str] | None = None,
) -> dict[str, Any]:
    methods = list(methods)
    if methods and unreliable and all(m in unreliable for m in methods):
        severity = _downgrade(severity)
        evidence = {**evidence, "downgraded": "only methods that failed the randomization test support it"}
    return {
        "id": f"{kind}/{cls or '*'}/{attribute or '*'}",
        "kind": kind,
        "class": cls,
        "attribute": attribute,
        "region": [round(float(v), 4) for v in region] if region is not None else None,
        "severity": severity,
        "score": float(np.clip(score, 0.0, 1.0)),
        "methods": methods,
        "message": message,
        "evidence": evidence,
    }


def _level(value: float, medium: float, high: float, smaller_is_worse: bool = False) -> str:
    if smaller_is_worse:
        return "high" if value <= high else "medium" if value <= medium else "low"
    return "high" if value >= high else "medium" if value >= medium else "low"


def background_flags(
    per_method: dict[str, dict[str, Any]], t: Thresholds, unreliable: set[str]
) -> list[dict[str, Any]]:
    """``background_reliance`` per class, merged over the methods that support it."""
    tests = [(m, c, r) for m, per_class in per_method.items() for c, r in per_class.items()]
    q = bh_adjust([r["p_value"] for _, _, r in tests])
    hits: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for (m, c, r), qv in zip(tests, q, strict=True):
        if r["n"] >= t.min_group and r["ci_high"] < t.background_ratio and qv < t.alpha:
            hits.setdefault(c, []).append((m, r))
    flags = []
    for c, support in hits.items():
        reliable = [(m, r) for m, r in support if m not in unreliable] or support
        ratio = float(np.median([r["median_ratio"] for _, r in reliable]))
        r0 = reliable[0][1]
        sev = _level(ratio, t.background_medium, t.background_high, smaller_is_worse=True)
        msg = (
            f"{r0['outside']:.0%} of the {c} class's attention falls outside the object, where a uniform map "
            f"would put {r0['chance_outside']:.0%}: the object gets {ratio:.2f}x its fair share of attention."
        )
        evidence = {
            "median_ratio": ratio,
            "by_method": {
                m: {k: r[k] for k in ("n", "median_ratio", "ci_low", "ci_high", "p_value", "outside", "chance_outside")}
                for m, r in support
            },
            "worst_ids": r0["worst_ids"],
        }
        flags.append(
            _flag(
                "background_reliance", c, None, sev, 1 - ratio, msg, evidence, [m for m, _ in support], None, unreliable
            )
        )
    return flags


def hotspot_flags(
    per_method: dict[str, dict[str, Any]], interventions: dict[str, Any], t: Thresholds, unreliable: set[str]
) -> list[dict[str, Any]]:
    """``spatial_hotspot`` per class; high severity requires a confirming intervention."""
    tests = [(m, c, r) for m, per_class in per_method.items() for c, r in per_class.items()]
    q = bh_adjust([r["p_value"] for _, _, r in tests])
    hits: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for (m, c, r), qv in zip(tests, q, strict=True):
        on_object = np.isfinite(r["object_overlap"]) and r["object_overlap"] > t.hotspot_object_overlap
        if (
            r["lift"] >= t.hotspot_lift
            and r["area"] <= t.hotspot_max_area
            and r["concentration"] >= t.hotspot_concentration
            and r["persistence"] >= t.hotspot_persistence
            and qv < t.alpha
            and not on_object
        ):
            hits.setdefault(c, []).append((m, r))
    flags = []
    for c, support in hits.items():
        r0 = max(support, key=lambda mr: mr[1]["lift"])[1]
        test = interventions.get(c)
        confirmed = bool(
            test
            and test["removal_drop"] >= t.intervention_effect
            and test["removal_p"] < t.alpha
            and test["paste_gain"] >= t.intervention_effect
            and test["paste_p"] < t.alpha
        )
        if confirmed:
            sev = "high"
        elif test is not None:
            sev = "low"
        else:
            sev = "medium" if r0["lift"] >= 2 * t.hotspot_lift else "low"
        msg = (
            f"The {c} class's maps concentrate on {r0['location']} ({r0['persistence']:.0%} of its images, "
            f"{r0['lift']:.1f}x the other classes' attention there)"
        )
        if test:
            drop, gain = -test["removal_drop"], test["paste_gain"]
            msg += (
                f"; removing that region {_change(drop, f'p({c})')} and pasting it into other images "
                f"{_change(gain, 'it')}" + ("" if confirmed else " (not significant)")
            )
        msg += "."
        evidence = {k: r0[k] for k in ("lift", "concentration", "persistence", "area", "p_value", "object_overlap")}
        evidence["intervention"] = test
        evidence["confirmed"] = confirmed
        flags.append(
            _flag(
                "spatial_hotspot",
                c,
                None,
                sev,
                min(1.0, r0["persistence"] * (1 - 1 / r0["lift"])),
                msg,
                evidence,
                [m for m, _ in support],
                r0["region"],
                unreliable,
            )
        )
    return flags


def attribute_flags(attrs: dict[str, Any], t: Thresholds) -> list[dict[str, Any]]:
    """``attribute_leak``: a (class, attribute value) group much less accurate than the rest of its class."""
    tests = [(a, x) for a, info in attrs.items() for x in info["tests"]]
    q = bh_adjust([x["p_value"] for _, x in tests])
    best: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
    for (a, x), qv in zip(tests, q, strict=True):
        if x["gap"] >= t.attribute_gap and qv < t.alpha:
            key = (a, x["class"])
            if key not in best or x["gap"] > best[key][0]["gap"]:
                best[key] = (x, float(qv))
    # Image properties (used when there is no metadata) are strongly correlated with each other (a brighter
    # image is also redder, greener, bluer): keep the strongest property per class, cite the others.
    props = [(a, c) for (a, c) in best if attrs[a]["kind"] == "property"]
    also: dict[tuple[str, str], list[str]] = {}
    for c in {c for _, c in props}:
        ranked = sorted((a for a, cc in props if cc == c), key=lambda a: -best[(a, c)][0]["gap"])
        also[(ranked[0], c)] = ranked[1:]
        for a in ranked[1:]:
            del best[(a, c)]
    flags = []
    for (a, c), (x, qv) in best.items():
        info = attrs[a]
        sev = _level(x["gap"], t.attribute_medium, t.attribute_high)
        what = f"{a} = {x['value']}" if info["kind"] == "metadata" else f"{a} {x['value']}"
        msg = (
            f"{c} images with {what} are classified correctly {x['accuracy']:.0%} of the time, vs "
            f"{x['rest_accuracy']:.0%} for the other {c} images; {a} alone predicts the model's output "
            f"{info['predicts_prediction']:.0%} and the true label {info['predicts_label']:.0%} of the way "
            "above chance."
        )
        evidence = {
            **{k: x[k] for k in ("value", "n", "accuracy", "rest_accuracy", "gap", "p_value")},
            "q_value": qv,
            "worst_group_accuracy": info["worst_group_accuracy"],
            "predicts_label": info["predicts_label"],
            "predicts_prediction": info["predicts_prediction"],
            "kind": info["kind"],
            "error_ids": x["ids"],
            "correlated_properties": also.get((a, c), []),
        }
        flags.append(_flag("attribute_leak", c, a, sev, x["gap"], msg, evidence))
    return flags


def counterfactual_flags(cf: dict[str, Any], t: Thresholds) -> list[dict[str, Any]]:
    """``counterfactual_background``: the class's own background, object removed, still calls the class."""
    items = list(cf.items())
    q = bh_adjust([r["p_value"] for _, r in items])
    flags = []
    for (c, r), qv in zip(items, q, strict=True):
        gap = r["bg_only_self"] - r["bg_only_other"]
        if r["n"] < t.min_group or gap < t.counterfactual_gap or not qv < t.alpha:
            continue
        sev = _level(gap, t.counterfactual_medium, t.counterfactual_high)
        msg = (
            f"With the object removed, {c} images are still called {c} {r['bg_only_self']:.0%} of the time "
            f"(other classes' backgrounds: {r['bg_only_other']:.0%}); {c} objects pasted on another class's "
            f"background are recognised {r['mixed_accuracy']:.0%} of the time (originals: {r['accuracy']:.0%})."
        )
        flags.append(_flag("counterfactual_background", c, None, sev, gap, msg, {**r, "q_value": float(qv)}))
    return flags


def cluster_flags(clusters: dict[str, Any], t: Thresholds) -> list[dict[str, Any]]:
    """``cluster``: a sizeable group of a class's maps that sits off the object while the class does not."""
    flags = []
    for c, info in clusters.items():
        for k in info.get("clusters", []):
            ratio, rest = k.get("median_ratio"), info.get("median_ratio")
            if ratio is None or rest is None or not np.isfinite(ratio) or not np.isfinite(rest):
                continue
            if k["share"] >= t.cluster_min_share and k["size"] >= t.min_group and ratio < 1 <= rest:
                msg = (
                    f"{k['size']} {c} images ({k['share']:.0%} of the class) form a cluster of explanations "
                    f"that sits off the object (its object share is {ratio:.2f}x chance, the class's "
                    f"{rest:.2f}x): review its prototypes."
                )
                flags.append(
                    _flag(
                        "cluster",
                        c,
                        f"cluster {k['cluster']}",
                        "medium" if ratio < 0.5 else "low",
                        (1 - ratio) * k["share"] * 2,
                        msg,
                        {**k, "method": info["method"]},
                        [info["method"]],
                    )
                )
    return flags


def unreliable_flags(mprt: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``unreliable_method`` for every method whose maps survive the randomization of the model's top layers."""
    if not mprt:
        return []
    flags = []
    for m, r in mprt["methods"].items():
        if r["unreliable"]:
            rho = r["spearman"][min(1, len(r["spearman"]) - 1)]
            msg = (
                f"{m}'s maps barely change when the model's top layers are re-initialized (rank correlation "
                f"{rho:.2f}): they reflect the architecture more than what this model learned."
            )
            flags.append(
                _flag(
                    "unreliable_method",
                    None,
                    m,
                    "medium",
                    rho,
                    msg,
                    {"spearman": r["spearman"], "ssim": r["ssim"], "blocks": mprt["randomized_blocks"]},
                    [m],
                )
            )
    return flags


def order_flags(flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most severe first, then by score."""
    return sorted(flags, key=lambda f: (-SEVERITIES.index(f["severity"]), -f["score"], f["id"]))

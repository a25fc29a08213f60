"""Findings: flags that share a cause, grouped, with one sentence saying what the model uses.

Several analyses often see one shortcut: a tag in a corner is a ``region_cue`` (found by intervention),
a ``spatial_hotspot`` (found in the maps) and a ``counterfactual_background`` (the object removed, the
class still called). A reader needs one finding: "the model recognises *tagged* by the bottom-left
corner", with all its evidence. The rules (pure, no torch):

- region flags (``region_cue``, ``subset_cue``, ``spatial_hotspot``) of a class whose regions overlap are one
  cause;
  region causes of several classes whose regions overlap by IoU >= 0.3 are one cause;
- ``global_cue`` flags group by property (colour, brightness) across classes;
- a class's background flags (``counterfactual_background``, ``background_reliance``) join that class's
  region cause, else its property cause, when there is one (the cue explains why the background carries
  the class), else they are one background cause (all such classes together);
- ``attribute_leak`` flags group by attribute across classes;
- ``cluster`` flags group by class; ``unreliable_method`` flags form one cause.

A finding's severity is its most severe flag's. ``examples`` (intervention images) are added by the run
stage, which has the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from auditor.shortcuts.flags import SEVERITY_RANK, Flag, pct
from auditor.shortcuts.grids import describe_location

SHARED_REGION_IOU = 0.3


@dataclass(frozen=True)
class Cause:
    """What a flag kind is evidence of, declared by its analysis (``Analysis.kinds``).

    Attributes:
        name: the cause the kind's flags group under: ``region`` (merged by overlapping regions),
            ``property`` (by property, across classes), ``background`` (joins its class's region or property
            cause, else one background cause), ``attribute`` (by attribute), ``cluster`` (by class),
            ``method`` (one cause); any other name groups by class, with its flags' own messages.
        leads: the kind names its cause's cue (an intervention where there is one); the finding's headline
            flag is the most severe leading flag.
    """

    name: str
    leads: bool = False


Causes = Mapping[str, Cause]  # flag kind -> cause (``catalog.causes()``)


class Example(TypedDict):
    """One intervention image pair of a finding (``maps/findings.npz`` holds the pixels under ``key``)."""

    key: str
    id: str
    what: str
    cls: str
    p_before: float
    p_after: float


class Finding(TypedDict):
    """``flags.json`` ``findings`` entry."""

    id: str
    cause: str
    classes: list[str]
    attribute: str | None
    region: list[float] | None
    severity: str
    score: float
    flags: list[str]
    sentence: str
    examples: list[Example]


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two normalized boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _best(flags: list[Flag], causes: Causes, cause: str = "") -> Flag:
    """The flag that names the cause: the most severe of the cause's leading kinds (any kind when it has
    none), flags found by intervention (that name no method) first among equals."""
    lead = [f for f in flags if (c := causes.get(f["kind"])) is not None and c.leads and c.name == cause] or flags
    return min(lead, key=lambda f: (-SEVERITY_RANK[f["severity"]], bool(f["methods"]), -f["score"]))


def _merge_regions(groups: list[list[Flag]], same_class: bool) -> list[list[Flag]]:
    """Merge groups whose regions overlap (any overlap within a class, IoU >= 0.3 across classes)."""
    merged: list[list[Flag]] = []
    for g in groups:
        for m in merged:
            pairs = [(a["region"], b["region"]) for a in g for b in m if a["region"] and b["region"]]
            hit = any(_overlap(x, y) > (0.0 if same_class else SHARED_REGION_IOU - 1e-9) for x, y in pairs)
            if hit and (not same_class or m[0]["class"] == g[0]["class"]):
                m.extend(g)
                break
        else:
            merged.append(list(g))
    return merged


def _subject(severity: str, names: str) -> str:
    """A low finding never says the model *recognises* a class by something: the evidence is too weak."""
    if SEVERITY_RANK[severity] >= SEVERITY_RANK["medium"]:
        return f"The model recognises {names}"
    return f"Weak evidence: the model may tell {names} apart"


def _off_object(flags: list[Flag]) -> bool:
    """Masks measured the region against the objects (a region mostly on them is never flagged)."""
    return any(isinstance(v, float) and math.isfinite(v) for f in flags for v in [f["evidence"].get("object_overlap")])


def _region_sentence(flags: list[Flag], classes: list[str], region: Sequence[float], severity: str) -> str:
    names = " and ".join(classes)
    where = describe_location(region)
    box = ", ".join(f"{v:.2f}" for v in region)
    # "not by the object" only where masks showed the region off the objects; without them it may be the object
    s = f"{_subject(severity, names)} by {where} (x0, y0, x1, y1 = {box})"
    s += ", not by the object" if _off_object(flags) else " (no masks: whether the objects lie there is not known)"
    cue = next((f for f in flags if f["kind"] == "region_cue" and f["evidence"].get("test")), None)
    part = next((f for f in flags if f["kind"] == "subset_cue" and f["evidence"].get("test")), None)
    if cue is not None:
        t, c = cue["evidence"]["test"], cue["class"]
        s += (
            f": removing that region from {c} images lowers p({c}) by {t['removal_drop']:.2f}, and pasting it "
            f"into other classes' images turns {pct(t['paste_flips'])} of them into {c}"
        )
    elif part is not None:  # a cue on part of the class: say on how much of it, and where the list is
        ev, c = part["evidence"], part["class"]
        s += (
            f", in {pct(ev['share'])} of the {c} images ({ev['k']} of {ev['n']}, listed in the evidence): removing "
            f"that region from them lowers p({c}) by {ev['test']['removal_drop']:.2f}, and pasting it into other "
            f"classes' images turns {pct(ev['test']['paste_flips'])} of them into {c}"
        )
    bg = next((f for f in flags if f["kind"] == "counterfactual_background" and "bg_only_self" in f["evidence"]), None)
    if bg is not None:
        still = pct(bg["evidence"]["bg_only_self"])
        s += f"; with the object removed, {bg['class']} is still called {still} of the time"
    return s + "."


def _sentence(cause: str, flags: list[Flag], classes: list[str], key: str | None, severity: str, causes: Causes) -> str:
    best = _best(flags, causes, cause)
    names = " and ".join(classes)
    if cause == "background":
        if any(f["kind"] == "counterfactual_background" for f in flags):  # the object removed: an intervention
            return f"{_subject(severity, names)} from the background: {best['message']}"
        # maps and activations alone say where the model looks, not what it uses
        weak = "" if SEVERITY_RANK[severity] >= SEVERITY_RANK["medium"] else " (weak evidence)"
        return f"The maps of {names} point to the background rather than the object{weak}. {best['message']}"
    if cause == "attribute":
        what = "image property" if best["evidence"].get("kind") == "property" else "metadata attribute"
        return f"The model's predictions for {names} follow the {what} {key!r}. {best['message']}"
    if cause == "property":
        return f"{_subject(severity, names)} by the image's overall {key}. {best['message']}"
    if cause == "cluster":
        return f"A group of {names} images is explained differently from the rest. {best['message']}"
    return best["message"]


def _finding(cause: str, flags: list[Flag], causes: Causes, key: str | None = None) -> Finding:
    best = _best(flags, causes, cause)
    worst = min(flags, key=lambda f: -SEVERITY_RANK[f["severity"]])
    classes = sorted({f["class"] for f in flags if f["class"] is not None})
    region = best["region"] if cause == "region" else None
    sev = worst["severity"]
    sentence = (
        _region_sentence(flags, classes, region, sev)
        if region is not None
        else _sentence(cause, flags, classes, key, sev, causes)
    )
    # a class may have two region cues (two tags): the place tells their findings apart
    place = describe_location(region).removeprefix("the ").replace(" ", "-") if region is not None else None
    ident = f"{cause}/{'+'.join(classes) or '*'}/{key or place or '*'}"
    return {
        "id": ident,
        "cause": cause,
        "classes": classes,
        "attribute": key if cause in ("attribute", "property") else None,
        "region": region,
        "severity": worst["severity"],
        "score": max(f["score"] for f in flags),
        "flags": [f["id"] for f in sorted(flags, key=lambda f: (-SEVERITY_RANK[f["severity"]], -f["score"]))],
        "sentence": sentence,
        "examples": [],
    }


def _claim(group: list[Flag], flags: list[Flag], claimed: set[str], causes: Causes) -> list[Flag]:
    """``group`` plus the background flags of its classes not claimed yet (the cue explains them)."""
    classes = {f["class"] for f in group}
    group = group + [
        f for f in flags if _cause(f, causes) == "background" and f["class"] in classes and f["id"] not in claimed
    ]
    claimed |= {f["id"] for f in group}
    return group


def _cause(flag: Flag, causes: Causes) -> str:
    c = causes.get(flag["kind"])
    return c.name if c is not None else flag["kind"]


GROUP_KEY = {  # cause -> the key its leftover flags group by (region and property causes are built first)
    "background": lambda f: None,
    "attribute": lambda f: f["attribute"],
    "cluster": lambda f: f["class"],
    "method": lambda f: None,
}


def group_findings(flags: list[Flag], causes: Causes) -> list[Finding]:
    """Group ``flags`` by cause (module docstring); findings most severe first, then by score.

    Args:
        flags: the run's flags.
        causes: flag kind -> :class:`Cause`, as the analyses declare them (``catalog.causes()``).
    """
    region = [f for f in flags if _cause(f, causes) == "region" and f["region"] is not None]
    out: list[Finding] = []
    claimed: set[str] = set()
    for g in _merge_regions(_merge_regions([[f] for f in region], same_class=True), same_class=False):
        out.append(_finding("region", _claim(g, flags, claimed, causes), causes))
    by_property: dict[str | None, list[Flag]] = {}
    for f in flags:
        if _cause(f, causes) == "property":
            by_property.setdefault(f["attribute"], []).append(f)
    for prop, g in by_property.items():
        out.append(_finding("property", _claim(g, flags, claimed, causes), causes, prop))
    keyed: dict[tuple[str, str | None], list[Flag]] = {}
    for f in flags:
        if f["id"] in claimed:
            continue
        cause = _cause(f, causes)
        key = GROUP_KEY[cause](f) if cause in GROUP_KEY else f["class"]
        keyed.setdefault((cause, key), []).append(f)
    for (cause, key), group in keyed.items():
        out.append(_finding(cause, group, causes, key if cause == "attribute" else None))
    return sorted(out, key=lambda x: (-SEVERITY_RANK[x["severity"]], -x["score"], x["id"]))


def finding_summary(findings: list[Finding]) -> dict[str, Any]:
    """``{high, medium, low}`` counts of findings (the report's headline)."""
    return {s: sum(f["severity"] == s for f in findings) for s in ("high", "medium", "low")}

"""``subset_cue``: a place that carries a class in *part* of its images (a watermark on 30% of the horses).

The region scan (``region_cue``) takes the median drop over a class's images, so a cue on a minority of them
cannot move it. This analysis starts from per-image evidence instead:

1. **Propose** (the maps, every image, no forward): each image's map peak. A place (peaks within
   ``subset_spread`` of it) where a share of the class's images peak (at least ``subset_min_share`` and
   ``subset_min_images``, at most ``subset_max_share``: above it the cue is on most of the class, the region
   scan's case) ``subset_lift`` times more often than other classes' images do is the candidate when the same
   search on label-shuffled images beats it in under ``alpha`` of 200 shuffles (the null is measured, the scan
   over every place included; a screen: the interventions decide). A salient decoy
   on every class's images draws the maps of every class alike and is not a candidate.
2. **Localize** on the *carriers* (the class's images that peak there): fill in half-size windows around the
   place and keep the median drop over the carriers; the region is the connected set within half of the peak,
   grown by one fine-window stride so that no sliver of the cue is left.
3. **Confirm** on the carriers: remove the region (ROAD imputation) and paste it, taken from the carriers, into
   other classes' images, against a control box of the same size, paired per image (as ``region_cue``). The
   same removal from the class's other images (the non-carriers) is reported: near zero for a true subset cue.

Cost per candidate: ``2 x (carriers + others)`` forwards for the confirmation and about 49 per carrier for
the localization (at most ``subset_images`` carriers). High severity needs a confirmed removal and transplant
and an effect comparable to taking the class away (``high_effect``); medium needs the removal to lower
p(class) by ``subset_effect`` beyond the control. With masks, a region that a quarter or more of the object
covers in most carriers is the object, not a cue; without masks, a central region is graded low (objects sit
near the centre, and a chance cluster of a few of them there cannot be told from a cue on part of the class).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, StrictInt
from scipy import ndimage

from auditor.io.sources import sample_key
from auditor.shortcuts.examples import finding_region_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, change, make_flag, pct
from auditor.shortcuts.grids import (
    GRID,
    Indexable,
    box_cells,
    by_chunk,
    control_box,
    describe_location,
    object_inside,
)
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.thresholds import SharedParams, params_of
from auditor.shortcuts.windows import grid_boxes, importance, locate

MAX_IDS = 500  # carrier ids kept in the evidence (the share and count cover them all)


class Params(SharedParams):
    """``subset_cue``'s thresholds (config ``thresholds``, flat keys)."""

    subset_min_share: float = Field(
        0.1, gt=0, lt=1, description="least share of a class's images whose maps peak at one place (a subset cue)"
    )
    subset_min_images: StrictInt = Field(
        5, ge=5, description="least images peaking there (a paired signed-rank test of fewer cannot reach p < 0.05)"
    )
    subset_spread: float = Field(
        0.03125, gt=0, le=0.25, description="peaks this close (share of the side, both axes) count as one place"
    )
    subset_max_share: float = Field(
        0.8, gt=0, le=1, description="above this share the place is on most of the class: region_cue's case"
    )
    subset_lift: float = Field(
        3.0, gt=1, description="the class's share of images peaking at the place / other classes' share there"
    )
    subset_window: float = Field(0.25, gt=0, le=0.5, description="side of the place's window (share of the side)")
    subset_images: StrictInt = Field(16, ge=4, description="carriers (and other images) the confirmation uses")
    subset_effect: float = Field(
        0.25,
        gt=0,
        le=1,
        description="least drop of p(class) beyond the control box when the place is removed from the carriers: the "
        "images were chosen because their maps peak there, so a cue they depend on takes much of p(class) with it",
    )


def peaks(maps: np.ndarray) -> np.ndarray:
    """``[n, 2]`` (y, x) of each ``[n, 32, 32]`` map's peak after a 3 x 3 mean, in grid cells (NaN maps: -1)."""
    smooth = ndimage.uniform_filter(np.nan_to_num(maps, nan=0.0), size=(1, 3, 3), mode="nearest")
    flat = smooth.reshape(len(maps), -1).argmax(1)
    out = np.stack([flat // GRID, flat % GRID], 1)
    out[~np.isfinite(maps).reshape(len(maps), -1).all(1)] = -1
    return out


def inside(points: np.ndarray, centre: Sequence[float], half: float) -> np.ndarray:
    """``[n]`` bool: points (grid cells) within ``half`` cells of ``centre`` on both axes."""
    return (np.abs(points[:, 0] - centre[0]) <= half) & (np.abs(points[:, 1] - centre[1]) <= half)


def window_counts(points: np.ndarray, radius: int) -> np.ndarray:
    """``[32, 32]``: how many points (grid cells) lie within ``radius`` cells of each cell, on both axes."""
    hist = np.zeros((GRID, GRID))
    np.add.at(hist, (points[:, 0], points[:, 1]), 1.0)
    return ndimage.uniform_filter(hist, size=2 * radius + 1, mode="constant") * (2 * radius + 1) ** 2


def _best(own: np.ndarray, other: np.ndarray, radius: int, t: Params) -> tuple[float, tuple[int, int], int, int]:
    """The place maximizing the class's share minus other classes' share among places meeting the bounds:
    ``(difference, (y, x), k own, k other)``; difference -1 when none does."""
    k = np.rint(window_counts(own, radius))
    ko = np.rint(window_counts(other, radius))
    share, other_share = k / len(own), ko / len(other)
    lift = share / np.maximum(other_share, 1 / len(other))
    ok = (k >= t.subset_min_images) & (share >= t.subset_min_share) & (share <= t.subset_max_share)
    ok &= lift >= t.subset_lift
    if not ok.any():
        return -1.0, (0, 0), 0, 0
    diff = np.where(ok, share - other_share, -1.0)
    y, x = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return float(diff[y, x]), (int(y), int(x)), int(k[y, x]), int(ko[y, x])


def propose(own: np.ndarray, other: np.ndarray, t: Params, seed: int = 0, draws: int = 200) -> dict[str, Any] | None:
    """The place where the class's map peaks gather most above other classes' (or None).

    The null is measured: the same search after shuffling which images are the class's (``draws`` keyed
    shuffles), so the scan over every place of the image is part of it; ``p`` is the share of shuffles whose
    best place beats the observed one. A cluster of objects that happens to sit in one place is what chance
    gives; a tag at one place in a fifth of the class is not.

    Args:
        own: ``[n_own, 2]`` peak cells of the class's images (-1 rows: no map).
        other: ``[n_other, 2]`` peak cells of the other classes' images.
        t: thresholds.
        seed: the draw's key (the shuffles are the same whatever the batch or shard).

    Returns:
        ``{centre, share, other_share, k, n, p, lift}`` of the best place, when it meets the bounds and p < alpha.
    """
    own, other = own[own[:, 0] >= 0], other[other[:, 0] >= 0]
    if len(own) < t.min_group or len(other) < t.min_group:
        return None
    radius = max(1, round(t.subset_spread * GRID))
    diff, (y, x), k, ko = _best(own, other, radius, t)
    if diff < 0:
        return None
    pooled, n = np.concatenate([own, other]), len(own)
    rng = np.random.default_rng(seed)
    beaten = 0
    for _ in range(draws):
        order = rng.permutation(len(pooled))
        beaten += _best(pooled[order[:n]], pooled[order[n:]], radius, t)[0] >= diff
    p = (1 + beaten) / (1 + draws)
    if p >= t.alpha:
        return None
    share, other_share = k / len(own), ko / len(other)
    return {"centre": [float(y), float(x)], "share": share, "other_share": other_share, "k": k, "n": len(own),
            "p": float(p), "lift": float(share / max(other_share, 1 / len(other)))}  # fmt: skip


def _maps(inputs: AnalysisInputs) -> tuple[Any, Indexable] | None:
    """The rows and ``[n, 32, 32]`` maps of the method the proposal reads (grad_cam where it ran)."""
    grids = inputs.grids
    for m in ["grad_cam", *inputs.methods]:
        if m in grids:
            return grids[m]
    return None


def measure(inputs: AnalysisInputs) -> Measurement:
    """Per class: the proposed place, its carriers (rows and ids) and the shares."""
    found = _maps(inputs)
    if found is None:
        return {"subset_cues": {}}
    rows, maps = found
    t = params_of(inputs.thresholds, Params)
    points = by_chunk(maps, peaks)
    labels = rows["label"].to_numpy()
    out: dict[str, Any] = {}
    for cls in inputs.classes:
        own = labels == cls
        place = propose(points[own], points[~own], t, sample_key(cls, inputs.seed, "subset-null"))
        if place is None:
            continue
        carrier = own & inside(points, place["centre"], max(1, round(t.subset_spread * GRID)))
        out[cls] = {
            **place,
            "carrier_rows": rows["row"].to_numpy()[carrier].tolist(),
            "ids": rows["id"].to_numpy()[carrier].tolist(),
            "other_rows": rows["row"].to_numpy()[own & ~carrier].tolist(),
        }
    return {"subset_cues": out}


def _window(centre: Sequence[float], side: float) -> list[float]:
    cy, cx = (centre[0] + 0.5) / GRID, (centre[1] + 0.5) / GRID
    x0, y0 = min(max(cx - side / 2, 0.0), 1 - side), min(max(cy - side / 2, 0.0), 1 - side)
    return [x0, y0, x0 + side, y0 + side]


def localize(drops: np.ndarray, boxes: Sequence[Sequence[float]], stride: float) -> list[float]:
    """The region from a fine scan over the carriers (median drop per window), grown by ``stride`` per side."""
    region = locate(importance(boxes, np.clip(np.median(drops, axis=0), 0, None)))
    grown = [region[0] - stride, region[1] - stride, region[2] + stride, region[3] + stride]
    return [float(min(max(v, 0.0), 1.0)) for v in grown]


def _subset_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: localize its place on its carriers and confirm it there against a control box."""
    assert inputs.intervener is not None
    t, first, found = params_of(inputs.thresholds, Params), inputs.first, measured["subset_cues"][cls]
    idx = inputs.classes.index(cls)
    carriers = first[first["row"].isin(found["carrier_rows"])]
    rows = np.sort(keyed_rows(carriers, t.subset_images, inputs.seed, "subset"))
    half = t.subset_window / 2
    near = _window(found["centre"], t.subset_window * 2)
    fine = grid_boxes(half, half / 2, near)
    region = localize(inputs.intervener.scan(rows.tolist(), idx, fine), fine, half / 2)
    others = first[first["label"] != cls]
    other = np.sort(keyed_rows(others, t.subset_images, inputs.seed, "subset-test"))
    test = inputs.intervener.region_test(rows.tolist(), other.tolist(), idx, region, control_box(region), inputs.seed)
    rest = first[first["row"].isin(found["other_rows"])]
    plain = np.sort(keyed_rows(rest, t.subset_images, inputs.seed, "subset-rest"))
    without = (
        inputs.intervener.region_test(plain.tolist(), other[:1].tolist(), idx, region, control_box(region), inputs.seed)
        if len(plain) >= 2
        else None
    )
    kept = {k: v for k, v in found.items() if k not in ("carrier_rows", "other_rows")}
    kept["ids"] = kept["ids"][:MAX_IDS]
    rest = None if without is None else {k: without[k] for k in ("removal_drop", "removal_effect")}
    return {
        **kept,
        "region": region,
        "location": describe_location(region),
        "test": test,
        "object_share": object_share(inputs.objects, rows.tolist(), region),
        "object_inside": object_inside(inputs.objects, rows, box_cells(region)),
        "non_carriers": None if rest is None else {"n": len(plain), **rest},
    }


WORK = PerClass(
    classes=lambda measured, inputs: list(measured["subset_cues"]),
    run=_subset_class,
    gather=lambda measured, results: {"subset_cues": results},
    what="subset confirmation, classes",
)


def tests(measured: Measurement) -> dict[str, float]:
    """The carriers' paired removal and transplant tests (the proposal's shuffle test is a screen, not evidence)."""
    out: dict[str, float] = {}
    for c, r in measured["subset_cues"].items():
        if r.get("test"):
            out |= {f"removal/{c}": r["test"]["removal_p"], f"paste/{c}": r["test"]["paste_p"]}
    return out


def object_share(objects: Indexable | None, rows: Sequence[int], region: Sequence[float], cover: float = 0.25) -> float:
    """Share of the ``rows`` images (with masks) whose object covers at least ``cover`` of the region's cells;
    NaN without masks."""
    if objects is None:
        return float("nan")
    obj = np.asarray(objects[np.asarray(rows, dtype=int)], dtype=np.float32)
    has = np.isfinite(obj).all(axis=(1, 2))
    if not has.any():
        return float("nan")
    return float((obj[has][:, box_cells(region)].mean(axis=1) >= cover).mean())


def _central(region: Sequence[float]) -> bool:
    return region[0] < 2 / 3 and region[2] > 1 / 3 and region[1] < 2 / 3 and region[3] > 1 / 3


def subset_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``subset_cue`` per class: medium when removing the place from the carriers lowers p(class) by
    ``subset_effect`` beyond the control and the removal's or the transplant's paired test is significant in the
    run's family; high when the transplant is confirmed (effect and test) and an effect reaches ``high_effect``."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("subset_cues", tests(measured))
    flags = []
    for c, r in measured["subset_cues"].items():
        test = r.get("test")
        if not test:
            continue
        on_object, inside = r["object_share"], r.get("object_inside", float("nan"))
        masked = bool(np.isfinite(on_object))
        if masked and (on_object > 0.5 or inside > 0.5):
            continue  # the object itself: on most carriers' objects, or (a large region) holding most of their object
        paste = test["paste_effect"] >= t.intervention_effect and q[f"paste/{c}"] < t.alpha
        # a paired signed-rank test of n carriers cannot go below 2^-n (8 carriers: 0.004, which a run's family
        # of 50 tests adjusts past 0.05): the removal's effect must be large, and one of the two tests significant
        if test["removal_effect"] < t.subset_effect or not (paste or q[f"removal/{c}"] < t.alpha):
            continue
        strong = np.nanmax([test["removal_effect"], test["paste_effect"], test["paste_flips"]]) >= t.high_effect
        sev = "high" if paste and strong else "medium"
        if not masked and _central(r["region"]):
            sev = "low"  # objects gather near the centre by chance on part of a class: without masks, unknowable
        ctrl = change(-test["control"]["removal_drop"], "it")
        msg = (
            f"In {pct(r['share'])} of the {c} images ({r['k']} of {r['n']}) the model's maps peak at {r['location']}, "
            f"where {pct(r['other_share'])} of other classes' images do; removing that region from those images "
            f"{change(-test['removal_drop'], f'p({c})')} (a control box: {ctrl}) and pasting it into other "
            f"classes' images turns {pct(test['paste_flips'])} of them into {c}"
        )
        rest = r.get("non_carriers")
        if rest:
            msg += f"; removing it from the other {c} images {change(-rest['removal_drop'], 'it')}"
        if not masked and _central(r["region"]):
            msg += "; the region is central, so without masks it may be the object itself"
        msg += ". The images that carry it are listed in the evidence."
        evidence = {k: r[k] for k in ("share", "other_share", "k", "n", "lift", "p", "ids", "non_carriers")}
        evidence |= {
            "test": test,
            "object_share": on_object,
            "object_inside": inside,
            "removal_q": q[f"removal/{c}"],
            "paste_q": q[f"paste/{c}"],
        }
        flags.append(
            make_flag("subset_cue", c, None, sev, min(1.0, test["removal_effect"]), msg, evidence, (), r["region"])
        )
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=finding_region_examples,
        name="subset_cues",
        params=Params,
        kinds={"subset_cue": Cause("region", leads=True)},
        needs=frozenset({"maps", "model"}),
        measure=measure,
        flag=subset_flags,
        evidence_ids=("ids",),
        per_class=WORK,
        tests=tests,
    )
)

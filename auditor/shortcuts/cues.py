"""``region_cue``: a fixed place in the image that carries a class, found by intervention, no mask needed.

A shortcut such as a tag, a watermark or a hospital token sits at the same place in every image of its
class; the object moves from image to image. So, per class, on a keyed draw of its images:

1. **Scan** (no map involved): fill each window of a coarse grid, and each band along the four edges of the
   same width and of twice it (a sky, a letterbox bar: no window holds them), from its surroundings, in every
   image, and keep the *median* drop of p(class) per window. A band is the peak only where no box gives 90% of
   its drop: not a grid window (a tag in a corner is inside two bands too), nor a box of half the side, scanned
   only then (an object that always sits by an edge lies in bands too; a sky spans the image). A window where
   the median drops is a place that matters in most images at once. The class's own baseline is the same median
   at the windows away from the peak; the effect is the peak minus that baseline, and must reach ``cue_drop``.
2. **Localize**: rescan the peak's neighbourhood with windows of half its size (half-width bands for a band); the
   region is the connected set of pixels whose mean drop (over the windows covering them) is within half of
   the peak's (for a band, extended to the image edge it lies along). Where removing it (step 3) gives
   under 80% of the scan's peak drop (the importance grid's edge can fall a pixel or two inside the cue,
   leaving a sliver), it is grown by 1/16 of a window (one pixel at 64 px) and retested, then by 2/16 and
   4/16, while each step adds a tenth of the peak drop; the first region that reproduces 80% is kept (else
   the one with the largest removal effect), and the share of the scan's drop it reproduces is reported
   (``reproduced``). At most four region tests per class.
3. **Confirm** (SpRAy / ImageNet-W logic): remove the region from class images the scan did not see
   (:func:`scan_split`: on the scanned ones the best of ~60 places beats its control by selection alone; ROAD
   imputation) and paste it into other classes' images at the same place, and do the same with a
   control box of the same size at the mirrored place, on the same images. Per image, the region's
   change minus the control's is the effect: its mean must reach ``intervention_effect`` and its paired
   Wilcoxon test be significant in the run's BH family, for the removal and for the transplant. High
   severity needs both, and an effect comparable to taking the class away (``high_effect``).

With masks (or boxes), a region mostly on the objects, or holding at least half of the object in most of the
class's images, is the object, not a cue, and is not flagged. Without them, a region at the centre could be
the object itself when objects always sit there; such a flag is low and says so (a cue planted at the centre
is then missed without masks: the price of a clean model coming out clean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, StrictInt, model_validator

from auditor.shortcuts.examples import finding_region_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, change, make_flag, pct
from auditor.shortcuts.grids import box_cells, control_box, describe_location, object_inside, object_overlap
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    gather_entries,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.thresholds import SharedParams, params_of
from auditor.shortcuts.triage import SCAN_PROBE_IMAGES, class_ceilings, out_of_reach, probe_reason, record
from auditor.shortcuts.windows import anchor, band_axis, band_boxes, edge_bands, grid_boxes, grow, importance, locate


class Params(SharedParams):
    """``region_cue``'s thresholds (config ``thresholds``, flat keys)."""

    cue_images: StrictInt = Field(
        12,
        ge=0,
        description="images per class scanned for a region cue (mask-free; at most half of the class, and fewer "
        "where 6 would not be left for the confirmation); 0 turns the scan off",
    )
    cue_window: float = Field(0.25, gt=0, le=0.5, description="side of the scan's windows (share of the image side)")
    cue_drop: float = Field(
        0.15, gt=0, le=1, description="least median p(class) drop at a place, above the class's other places"
    )

    @model_validator(mode="after")
    def _cue_scan_can_run(self) -> Self:
        """A scan must be able to call a place common to a class's images (under 4 images it was silently off)."""
        if 0 < self.cue_images < 4:
            raise ValueError(f"cue_images must be 0 (the scan off) or at least 4; got {self.cue_images}")
        return self


REPRODUCE = 0.8  # a located region whose removal gives less of the scan's peak drop is grown and retested
GROW_GAIN = 0.1  # ... while each growth step adds at least this share of the peak drop
LOCAL_SHARE = 0.9  # a box (a grid window, else a half-side box) with this share of a band's drop is preferred to it
BOX = 0.5  # side of the boxes scanned where no grid window holds a band's drop
HELD_OUT = 6  # least images of a class, unseen by the scan, that a region is confirmed on above ``low``


def scan_split(n: int, cue_images: int) -> tuple[int, int]:
    """(images scanned, images held out for the confirmation) of a class of ``n`` images. The scan's images would
    confirm its best place by selection alone. It takes ``cue_images``, at most half of the class (at least 4): a
    paired test on ``k`` images gives no p under ``2^-k``, and on 8 held out (0.004) a tag that took the class away
    failed a 157-test BH family. Where under ``HELD_OUT`` would be left, the scan takes fewer (down to 4); a class
    under ``4 + HELD_OUT`` images is scanned on ``min(cue_images, n)``, none held out (``low`` at most)."""
    scanned = min(cue_images, n)
    if scanned < 4:
        return scanned, n - scanned
    half = min(scanned, max(4, n // 2))
    if n - half >= HELD_OUT:
        return half, n - half
    if n - 4 >= HELD_OUT:
        return n - HELD_OUT, HELD_OUT
    return scanned, 0


def reproduce(
    tight: list[float], peak: float, stride: float, region_test: Callable[[list[float]], dict[str, Any]]
) -> tuple[list[float], dict[str, Any]]:
    """The tightest of ``tight``, grown by ``stride``, twice and four times it, whose removal gives
    ``REPRODUCE`` of the scan's ``peak`` drop (the importance grid's edge can fall a pixel or two inside a cue
    and leave a sliver the model still reads); where none does, the one with the largest removal effect.
    Growing stops early when a step adds under ``GROW_GAIN`` of the peak to the removal's drop: uncovering a
    sliver gives a jump; a region the removal barely moves does not become a cue a pixel wider.
    Returns the region and its test (two to four tests)."""
    best: tuple[list[float], dict[str, Any]] | None = None
    before: float | None = None
    for by in (0.0, stride, 2 * stride, 4 * stride):
        region = grow(tight, by) if by else list(tight)
        test = region_test(region)
        if test["removal_drop"] >= REPRODUCE * peak:
            return region, test
        if best is None or test["removal_effect"] > best[1]["removal_effect"]:
            best = (region, test)
        if before is not None and test["removal_drop"] - before < GROW_GAIN * peak:
            break  # the step uncovered no sliver: the region is not short of a cue by a few pixels
        before = test["removal_drop"]
    assert best is not None
    return best


def scan_summary(
    drops: np.ndarray,
    boxes: Sequence[Sequence[float]],
    min_drop: float,
    centre: Callable[..., np.ndarray] = np.median,
) -> dict[str, Any]:
    """The peak window of a coarse scan and the class's own baseline.

    Args:
        drops: ``[n, len(boxes)]`` p(class) drops (``interventions.occlusion_scan``).
        boxes: the scanned windows.
        min_drop: the drop an image must show to count as consistent.
        centre: the per-window statistic over images (the scan's median; the triage probe's mean, which a cue on
            half of the probe's few images still moves).

    Returns:
        ``{peak, peak_box, baseline, effect, consistency, median}``: ``median`` per window; ``baseline`` =
        the 90th percentile of the medians at windows not overlapping the peak window (0 when none);
        ``effect`` = peak - max(baseline, 0); ``consistency`` = share of images dropping by ``min_drop``
        at the peak window.
    """
    median = centre(drops, axis=0)
    j = int(np.argmax(median))
    pb = boxes[j]
    away = [i for i, b in enumerate(boxes) if b[0] >= pb[2] or b[2] <= pb[0] or b[1] >= pb[3] or b[3] <= pb[1]]
    baseline = float(np.percentile(median[away], 90)) if away else 0.0
    return {
        "peak": float(median[j]),
        "peak_box": [float(v) for v in pb],
        "baseline": baseline,
        "effect": float(median[j] - max(baseline, 0.0)),
        "consistency": float((drops[:, j] >= min_drop).mean()),
        "median": np.round(median, 4).tolist(),
    }


def measure(inputs: AnalysisInputs) -> Measurement:
    """The scan needs the model: without it, nothing is measured (``intervene`` fills ``cues``)."""
    return {"cues": {}}


def _coarse_drops(
    inputs: AnalysisInputs, rows: list[int], idx: int, boxes: list[list[float]], cls: str, triaged: dict[str, str]
) -> np.ndarray | None:
    """The coarse scan's ``[n, len(boxes)]`` drops. With ``triage``, its first ``SCAN_PROBE_IMAGES`` images first:
    where no window's mean drop over them, above the other windows', reaches half of ``cue_drop``, None (the
    reason recorded in ``triaged``); else the rest are scanned and the probe's drops kept (the same drops as a
    scan in one go)."""
    assert inputs.intervener is not None
    t = params_of(inputs.thresholds, Params)
    if not t.triage or len(rows) <= SCAN_PROBE_IMAGES:
        return inputs.intervener.scan(rows, idx, boxes)
    head = inputs.intervener.scan(rows[:SCAN_PROBE_IMAGES], idx, boxes)
    probe = scan_summary(head, boxes, t.cue_drop, centre=np.mean)["effect"]
    what = "the largest mean drop of p at a window, above the other windows'"
    if record(triaged, cls, probe_reason(what, probe, t.cue_drop, SCAN_PROBE_IMAGES)):
        return None
    return np.vstack([head, inputs.intervener.scan(rows[SCAN_PROBE_IMAGES:], idx, boxes)])


def held(band: dict[str, Any], box: dict[str, Any]) -> bool:
    """Whether a box's scan (:func:`scan_summary`) holds a band's peak drop: ``LOCAL_SHARE`` of it."""
    return bool(box["peak"] >= LOCAL_SHARE * band["peak"])


def _peak(
    inputs: AnalysisInputs, rows: list[int], idx: int, drops: np.ndarray, coarse: list[list[float]], n_grid: int
) -> dict[str, Any]:
    """The coarse scan's summary (``drops``: ``[n, len(coarse)]``, the grid's ``n_grid`` windows first). A band
    is the peak only where no box holds its drop: a grid window (a tag in a corner lies in two bands too), else a
    box of ``BOX`` the side, scanned only then (an object that always sits by an edge lies in bands too, and the
    box is judged as any region is, centre included; a sky spans the image: half of it leaves the class)."""
    assert inputs.intervener is not None
    t = params_of(inputs.thresholds, Params)
    found = scan_summary(drops, coarse, t.cue_drop)
    if band_axis(found["peak_box"]) is None:
        return found
    local = scan_summary(drops[:, :n_grid], coarse[:n_grid], t.cue_drop)
    if held(found, local):
        return local
    if found["effect"] < t.cue_drop:
        return found  # no region follows: nothing to hold
    boxes = grid_boxes(BOX, BOX / 2)
    box = scan_summary(inputs.intervener.scan(rows, idx, boxes), boxes, t.cue_drop)
    band = {"band_peak": found["peak"], "band_box": found["peak_box"]}
    return box | band if held(found, box) else found | {"box_peak": box["peak"]}


def _scan_class(inputs: AnalysisInputs, cls: str, triaged: dict[str, str]) -> dict[str, Any] | None:
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    own = first[first["label"] == cls]
    rows = keyed_rows(own, scan_split(len(own), t.cue_images)[0], inputs.seed, "cue", own["correct"])
    if len(rows) < 4:
        return None  # too few to call anything "the same place in most images" (or the scan is off)
    idx = inputs.classes.index(cls)
    w = t.cue_window
    grid = grid_boxes(w, w / 2)
    coarse = grid + edge_bands(w) + edge_bands(min(2 * w, 0.5))  # two band scales
    drops = _coarse_drops(inputs, rows.tolist(), idx, coarse, cls, triaged)
    if drops is None:
        return None
    found = _peak(inputs, rows.tolist(), idx, drops, coarse, len(grid))
    out: dict[str, Any] = {"n": len(rows), "window": t.cue_window, **found, "region": None}
    out["scanned"] = sorted(int(r) for r in rows)
    if found["effect"] < t.cue_drop:
        return out
    pb, axis = found["peak_box"], band_axis(found["peak_box"])  # a band is refined across its width only
    half = t.cue_window / 2 if axis is not None else (pb[2] - pb[0]) / 2
    near = grow(pb, half)
    fine = grid_boxes(half, half / 2, near) if axis is None else band_boxes(half, half / 2, near, axis)
    fine_drops = np.median(inputs.intervener.scan(rows.tolist(), idx, fine), axis=0)
    region = locate(importance(fine, np.clip(fine_drops, 0, None)))
    if axis is not None:
        region = anchor(region, pb)
    return {
        **out,
        "region": region,
        "location": describe_location(region),
        "area": float((region[2] - region[0]) * (region[3] - region[1])),
        "object_overlap": object_overlap(inputs.objects, own["row"].to_numpy(), box_cells(region)),
        "ids": own.set_index("row").loc[rows, "id"].head(6).tolist(),
    }


def _test_rows(own: pd.DataFrame, scanned: list[int], found: dict[str, Any], t: Params, seed: int) -> np.ndarray:
    """The class's images the region is confirmed on: a keyed draw of those the scan did not see (``scan_split``),
    or, where too few remain, of all of them (``found["held_out"]`` says which)."""
    unseen = own[~own["row"].isin(scanned)]
    found["held_out"] = len(unseen) >= HELD_OUT
    return np.sort(keyed_rows(unseen if found["held_out"] else own, t.intervention_images, seed, "cue-test"))


def _region_test(
    inputs: AnalysisInputs, own: list[int], other: list[int], idx: int, box: list[float]
) -> dict[str, Any]:
    """Remove / paste ``box`` against its control box (:meth:`Intervener.region_test`)."""
    assert inputs.intervener is not None
    return inputs.intervener.region_test(own, other, idx, box, control_box(box), inputs.seed)


def _cue_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: scan it, then confirm its located region against a control box; returns
    ``{"cue": the class's entry of ``cues`` or None, "triage": why it was not examined in full or None}``."""
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    least = max(t.cue_drop, t.intervention_effect)  # the scan's drop and the removal's effect: both needed
    ceilings = inputs.memo("ceilings", lambda: class_ceilings(first, inputs.target))
    triaged: dict[str, str] = {}
    if t.triage and record(triaged, cls, out_of_reach(ceilings, cls, least)):
        return {"cue": None, "triage": triaged[cls]}
    found = _scan_class(inputs, cls, triaged)
    if found is None:
        return {"cue": None, "triage": triaged.get(cls)}
    scanned = found.pop("scanned")
    if found["region"] is None:
        return {"cue": found, "triage": None}
    own = _test_rows(first[first["label"] == cls], scanned, found, t, inputs.seed)
    other = np.sort(keyed_rows(first[first["label"] != cls], t.intervention_images, inputs.seed, "cue-test"))
    tight, idx = found["region"], inputs.classes.index(cls)
    removal = partial(_region_test, inputs, own.tolist(), [] if t.triage else other.tolist(), idx)
    region, test = reproduce(tight, found["peak"], t.cue_window / 16, removal)  # 1 px at 64 px
    if t.triage and len(other) and test["removal_effect"] >= t.intervention_effect:
        test = _region_test(inputs, own.tolist(), other.tolist(), idx, region)  # the transplant too
    elif t.triage and len(other):
        found["transplant"] = (
            f"not run: removing the region lowers p({cls}) by {test['removal_effect']:.3f} beyond the control, "
            f"under the {t.intervention_effect} any flag needs"
        )
    if region != tight:
        area = float((region[2] - region[0]) * (region[3] - region[1]))
        found |= {"region": region, "location": describe_location(region), "area": area, "grown": True}
    rows = first[first["label"] == cls]["row"].to_numpy()
    found["object_overlap"] = object_overlap(inputs.objects, rows, box_cells(found["region"]))
    found["object_inside"] = object_inside(inputs.objects, rows, box_cells(found["region"]))
    found["test"] = test
    found["reproduced"] = float(test["removal_drop"] / found["peak"]) if found["peak"] > 0 else float("nan")
    return {"cue": found, "triage": None}


WORK = PerClass(
    classes=lambda measured, inputs: list(inputs.classes),
    run=_cue_class,
    gather=gather_entries("cues", "cue"),
    what="region scan, classes",
)


def tests(measured: Measurement) -> dict[str, float]:
    """The paired removal and transplant tests (region minus control box) of every class intervened on."""
    out: dict[str, float] = {}
    for c, r in measured["cues"].items():
        if r.get("test"):
            out[f"removal/{c}"] = r["test"]["removal_p"]
            if r["test"]["n_pasted"]:  # a transplant that did not run is no test
                out[f"paste/{c}"] = r["test"]["paste_p"]
    return out


def _central(region: Sequence[float]) -> bool:
    """Does the region touch the central ninth of the image? (A full-width or full-height band: is its middle
    line in the middle third? Every band crosses the centre along its length.)"""
    axis = band_axis(region)
    if axis is not None:
        mid = (region[1] + region[3]) / 2 if axis == "h" else (region[0] + region[2]) / 2
        return 1 / 3 < mid < 2 / 3
    return region[0] < 2 / 3 and region[2] > 1 / 3 and region[1] < 2 / 3 and region[3] > 1 / 3


def confirmation(c: str, r: dict[str, Any], t: Params, q: dict[str, float]) -> dict[str, Any]:
    """Removal and transplant effects over the control box (paired, per image), and whether each is confirmed:
    at least ``intervention_effect`` and significant (``q``: the run's q-values of :func:`tests`)."""
    test = r.get("test")
    if not test:
        return {"removal_effect": float("nan"), "paste_effect": float("nan"), "removal": False, "paste": False}
    qr, qp = q[f"removal/{c}"], q.get(f"paste/{c}", 1.0)
    return {
        "removal_effect": float(test["removal_effect"]),
        "paste_effect": float(test["paste_effect"]),
        "removal_q": qr,
        "paste_q": qp,
        "removal": bool(test["removal_effect"] >= t.intervention_effect and qr < t.alpha),
        "paste": bool(test["paste_effect"] >= t.intervention_effect and qp < t.alpha),
    }


def _message(c: str, r: dict[str, Any], conf: dict[str, Any], masked: bool) -> str:
    msg = (
        f"Filling in {r['location']} lowers p({c}) by a median {r['peak']:.2f} across {c} images "
        f"({pct(r['consistency'])} of them drop, other places: {max(r['baseline'], 0):.2f})"
    )
    test = r.get("test")
    unseen = "other " if r.get("held_out", False) else ""
    if test and test.get("n_pasted") == 0:
        removed = change(-test["removal_drop"], f"p({c})")
        msg += f"; removing that region from {unseen}{c} images {removed} (no other class's images to paste it into)"
    elif test:
        ctrl = test["control"]
        msg += (
            f"; removing that region from {test['n_removed']} {unseen}{c} images "
            f"{change(-test['removal_drop'], f'p({c})')} and pasting it "
            f"into other classes' images {change(test['paste_gain'], 'it')}, turning {pct(test['paste_flips'])} "
            f"of them into {c} (the same for a control box of the same size: {change(-ctrl['removal_drop'], 'it')} "
            f"and {change(ctrl['paste_gain'], 'it')})"
        )
        share = r.get("reproduced")
        if share is not None and np.isfinite(share) and share < REPRODUCE:
            given = pct(min(max(share, 0.0), 1.0))
            msg += f"; the region's removal gives {given} of the scan's drop: the cue may extend beyond it"
    if not masked and _central(r["region"]):
        msg += "; the region is central, so without masks it may be the object itself"
    if test and not r.get("held_out", False):
        msg += (
            f"; the class has too few images to confirm the region on images the scan did not see ({HELD_OUT} needed "
            "besides the 4 scanned), so the place was tested on the images it was chosen on, which favours it"
        )
    return msg + "."


def cue_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``region_cue`` per class: medium when the removal beats the control box; high when the transplant does too
    and an effect reaches ``high_effect`` (comparable to taking the class away)."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("cues", tests(measured))
    flags = []
    for c, r in measured["cues"].items():
        if r.get("region") is None or r["effect"] < t.cue_drop or r["n"] < 4:
            continue
        overlap, inside = r["object_overlap"], r.get("object_inside", float("nan"))
        masked = bool(np.isfinite(overlap))
        if masked and (overlap > t.hotspot_object_overlap or inside > 0.5):
            continue  # the object itself: mostly on the objects, or holding most of the object in most images
        conf = confirmation(c, r, t, q)
        if not conf["removal"]:
            continue  # the region alone does not carry the class: the scan found a combination
        strong = np.nanmax([conf["removal_effect"], conf["paste_effect"], r["test"]["paste_flips"]]) >= t.high_effect
        sev = "high" if conf["paste"] and strong else "medium"
        if not masked and _central(r["region"]):
            sev = "low"  # objects sit near the centre: without masks, the region may be the object itself
        if not r.get("held_out", False):
            sev = "low"  # confirmed on the images the place was chosen on: selection, not evidence
        evidence = {
            k: r[k] for k in ("n", "peak", "baseline", "effect", "consistency", "area", "object_overlap", "ids")
        }
        evidence["reproduced"] = r.get("reproduced")
        evidence["held_out"] = bool(r.get("held_out", False))
        evidence |= {"test": r.get("test"), **conf}
        score = min(1.0, r["effect"])
        msg = _message(c, r, conf, masked)
        flags.append(make_flag("region_cue", c, None, sev, score, msg, evidence, (), r["region"]))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=finding_region_examples,
        name="cues",
        params=Params,
        kinds={"region_cue": Cause("region", leads=True)},
        needs=frozenset({"model"}),
        measure=measure,
        flag=cue_flags,
        evidence_ids=("ids",),
        per_class=WORK,
        tests=tests,
    )
)

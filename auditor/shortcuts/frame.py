"""``frame_cue``: the image's border carries a class, found by intervention, no mask needed.

Letterboxing or padding that differs between sources, a scanner's frame, a photographer's mat, a marker
stamped at a random place along the edge: such a cue lies along the border, but no one window holds it in
every image, so the region scan (``region_cue``) cannot find it, and it is no global colour either. Per
class, on keyed draws of images:

1. remove the border band (``frame_width`` of the side, all four sides; ROAD imputation from the inside)
   from the class's images, and paste the band of the class's images into other classes' images;
2. do the same, on the same images, with a control: the ring just inside the band, of the same area;
3. per image, the band's change minus the ring's (the ring floored at 0) is the effect: its mean must reach
   ``intervention_effect`` and its paired Wilcoxon test be significant in the run's BH family.

High when the removal and the transplant both confirm, medium when only the removal does. An object that
reaches the border loses part of itself with the band, but more of itself with the ring, which lies
closer to where objects sit: the control is conservative. With masks, a band mostly on the objects is
the object and is not flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from auditor.shortcuts.examples import ExampleMaker, region_examples
from auditor.shortcuts.findings import Cause, Example, Finding
from auditor.shortcuts.flags import Flag, change, make_flag, pct
from auditor.shortcuts.grids import GRID, object_overlap
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
from auditor.shortcuts.triage import PROBE_IMAGES, class_ceilings, out_of_reach, probe_reason


class Params(SharedParams):
    """``frame_cue``'s thresholds (config ``thresholds``, flat keys)."""

    frame_width: float = Field(
        0.1,
        ge=0,
        le=0.14,  # wider, the image inside the band is smaller than the band: no control ring of its area fits
        description="width of the border band removed and transplanted (share of the image side); 0 turns the "
        "border test off",
    )


def band(width: float) -> list[list[float]]:
    """The border band of ``width`` (share of the side) as four normalized boxes: top, bottom, left, right."""
    w = width
    return [[0.0, 0.0, 1.0, w], [0.0, 1.0 - w, 1.0, 1.0], [0.0, w, w, 1.0 - w], [1.0 - w, w, 1.0, 1.0 - w]]


def ring(width: float) -> list[list[float]]:
    """The control: the ring just inside :func:`band`, of the same area (as four boxes).

    The band covers ``1 - (1 - 2w)^2`` of the image; the ring from ``w`` to ``w + r`` covers
    ``(1 - 2w)^2 - (1 - 2w - 2r)^2``; equal areas give ``1 - 2w - 2r = sqrt(1 - 8w + 8w^2)``.
    """
    w = width
    inner = math.sqrt(max(1.0 - 8 * w + 8 * w * w, 0.0))
    e = w + (1.0 - 2 * w - inner) / 2  # the ring's inner edge
    return [[w, w, 1.0 - w, e], [w, 1.0 - e, 1.0 - w, 1.0 - w], [w, e, e, 1.0 - e], [1.0 - e, e, 1.0 - w, 1.0 - e]]


def band_cells(width: float) -> np.ndarray:
    """``[32, 32]`` bool: the analysis grid's cells in the band."""
    k = max(1, round(width * GRID))
    cells = np.zeros((GRID, GRID), dtype=bool)
    cells[:k], cells[-k:], cells[:, :k], cells[:, -k:] = True, True, True, True
    return cells


def measure(inputs: AnalysisInputs) -> Measurement:
    """The test needs the model: without it nothing is measured (``intervene`` fills ``frames``)."""
    return {"frames": {}}


def _frame_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: remove and transplant its border band and the control ring (keyed draws of
    images). Returns ``{"frame": the class's entry of ``frames`` or None, "triage": reason or None}``."""
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    mine = first[first["label"] == cls]
    own = np.sort(keyed_rows(mine, t.intervention_images, inputs.seed, "frame"))
    other = np.sort(keyed_rows(first[first["label"] != cls], t.intervention_images, inputs.seed, "frame"))
    if len(own) < t.min_group or len(other) < t.min_group:
        return {"frame": None, "triage": None}
    idx = inputs.classes.index(cls)
    ceilings = inputs.memo("ceilings", lambda: class_ceilings(first, inputs.target))
    if t.triage:
        reason = out_of_reach(ceilings, cls, t.intervention_effect) or _probe(inputs, mine, idx, t)
        if reason is not None:
            return {"frame": None, "triage": reason}
    test = inputs.intervener.region_test(
        own.tolist(), other.tolist(), idx, band(t.frame_width), ring(t.frame_width), inputs.seed
    )
    overlap = object_overlap(inputs.objects, mine["row"].to_numpy(), band_cells(t.frame_width))
    return {"frame": {"n": len(own), "width": t.frame_width, "object_overlap": overlap, "test": test}, "triage": None}


WORK = PerClass(
    classes=lambda measured, inputs: list(inputs.classes) if params_of(inputs.thresholds, Params).frame_width else [],
    run=_frame_class,
    gather=gather_entries("frames", "frame"),
    what="border test, classes",
)


def _probe(inputs: AnalysisInputs, mine: pd.DataFrame, idx: int, t: Params) -> str | None:
    """The triage probe: the band's removal, against the ring's, from the first ``PROBE_IMAGES`` images of the
    class's keyed draw; why the full test is not run (None: it is)."""
    assert inputs.intervener is not None
    head = np.sort(keyed_rows(mine, PROBE_IMAGES, inputs.seed, "frame")).tolist()
    test = inputs.intervener.region_test(head, [], idx, band(t.frame_width), ring(t.frame_width), inputs.seed)
    return probe_reason("the border's removal effect", test["removal_effect"], t.intervention_effect, len(head))


def tests(measured: Measurement) -> dict[str, float]:
    """The paired removal and transplant tests (band minus ring) of every class tested."""
    out: dict[str, float] = {}
    for c, r in measured["frames"].items():
        out |= {f"removal/{c}": r["test"]["removal_p"], f"paste/{c}": r["test"]["paste_p"]}
    return out


def _message(c: str, r: dict[str, Any]) -> str:
    test, ctrl = r["test"], r["test"]["control"]
    return (
        f"Removing the image border ({pct(r['width'])} of the side, all four sides) from {c} images "
        f"{change(-test['removal_drop'], f'p({c})')}, and pasting the border of {c} images into other classes' "
        f"images {change(test['paste_gain'], 'it')}, turning {pct(test['paste_flips'])} of them into {c} (the same "
        f"for the ring just inside the border: {change(-ctrl['removal_drop'], 'it')} and "
        f"{change(ctrl['paste_gain'], 'it')})."
    )


def frame_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``frame_cue`` per class: the band's removal beats the ring's (medium); its transplant too (high)."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("frame", tests(measured))
    flags = []
    for c, r in measured["frames"].items():
        test, overlap = r["test"], r["object_overlap"]
        if np.isfinite(overlap) and overlap > t.hotspot_object_overlap:
            continue  # with masks: the band is mostly the objects
        removal = test["removal_effect"] >= t.intervention_effect and q[f"removal/{c}"] < t.alpha
        paste = test["paste_effect"] >= t.intervention_effect and q[f"paste/{c}"] < t.alpha
        if not removal:
            continue  # the border alone does not carry the class
        evidence = {**r, "removal_q": q[f"removal/{c}"], "paste_q": q[f"paste/{c}"], "confirmed": bool(paste)}
        score = float(min(1.0, max(test["removal_effect"], 0.0)))
        flags.append(make_flag("frame_cue", c, None, "high" if paste else "medium", score, _message(c, r), evidence))
    return flags


def frame_examples(
    finding: Finding, flags: Mapping[str, Flag], first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """The border band removed from the class's images, and the band of one of them pasted into another's."""
    lead = next(flags[i] for i in finding["flags"] if i in flags and flags[i]["kind"] == "frame_cue")
    return region_examples(finding, band(lead["evidence"]["width"]), first, ids, maker, n, "border")


ANALYSIS = register_analysis(
    Analysis(
        examples=frame_examples,
        name="frame",
        params=Params,
        kinds={"frame_cue": Cause("frame", leads=True)},
        needs=frozenset({"model"}),
        measure=measure,
        flag=frame_flags,
        per_class=WORK,
        tests=tests,
    )
)

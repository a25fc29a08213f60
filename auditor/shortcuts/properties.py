"""``global_cue``: the prediction follows a global image property (colour, brightness), no metadata needed.

Sky colour, illumination, a scanner's tint: a cue spread over the whole image has no region to remove.
It can be moved instead. Per class, the mean colour of its images (per channel, pixel space) is compared
with the other classes'; the class's images are shifted toward the others' colour and the others' toward
the class's (``interventions.shift_intervention``). Each shift has a control: the same shift in the
opposite direction, which changes the image as much but not toward the other side. The flag stands on
the *difference* between shift and control (``property_effect``): a model that any large colour change
breaks moves under both, a model that follows the property only under the shift toward the other side.
The test also runs sparing each image's object (its mask grown by a margin; without a mask, the pixels
holding half of the model's map mass, at most a quarter of the image), and must hold there too: a model
that reads the object's own colour (a red disc against a blue square) follows a whole-image shift, but
not one that leaves the object alone; a colour cast moves the prediction from outside the object.
A model that pools colour over the whole image can still follow a background shift in part; where masks
exist, the counterfactual (object removed, class still called?) tells such a fragility from a cue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from auditor.shortcuts.examples import ExampleMaker, shift_examples
from auditor.shortcuts.findings import Cause, Example, Finding
from auditor.shortcuts.flags import Flag, make_flag, pct
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.removals import removed_gaps
from auditor.shortcuts.thresholds import SharedParams, ordered, params_of
from auditor.shortcuts.triage import PROBE_IMAGES, probe_reason, too_few_called


class Params(SharedParams):
    """``global_cue``'s thresholds (config ``thresholds``, flat keys)."""

    property_effect: float = Field(
        0.25,
        gt=0,
        le=1,
        description="least share of images that follow a colour shift beyond the opposite shift (global_cue)",
    )
    property_high: float = Field(0.5, gt=0, le=1, description="high when the whole-image effect reaches this")

    @model_validator(mode="after")
    def _properties_levels_in_order(self) -> Self:  # a unique name: Thresholds inherits every analysis's
        ordered(self, "property_effect", "property_high")
        return self


CHANNELS = ("red", "green", "blue")


def colour_shifts(first: Any, classes: list[str], min_group: int) -> dict[str, Any]:
    """Per class: ``delta`` = other classes' mean *background* colour minus the class's (``bg_*``: outside the
    objects with masks, the border band without; the whole image's ``prop_*`` for runs made before), its size
    and what it changes. A class told apart by its objects' colour has another mean image colour but the same
    backgrounds, so its shift is small and moves no prediction: the shift goes where the classes differ.

    Returns:
        ``{class: {n, delta [3], size, property}}``; ``property`` = ``brightness`` when the shift runs mostly
        along the grey axis (its grey component >= 0.8 of its length), else ``colour``.
    """
    cols = [f"bg_{c}" for c in CHANNELS]
    if not set(cols) <= set(first.columns) or not first[cols].notna().all().all():
        cols = [f"prop_{c}" for c in CHANNELS]
    if not set(cols) <= set(first.columns):
        return {}
    out: dict[str, Any] = {}
    for cls in classes:
        own, rest = first[first["label"] == cls], first[first["label"] != cls]
        if len(own) < min_group or len(rest) < min_group:
            continue
        delta = rest[cols].to_numpy(np.float64).mean(0) - own[cols].to_numpy(np.float64).mean(0)
        size = float(np.linalg.norm(delta))
        grey = abs(float(delta.sum())) / np.sqrt(3)
        out[cls] = {
            "n": len(own),
            "delta": [float(v) for v in delta],
            "size": size,
            "property": "brightness" if size > 0 and grey >= 0.8 * size else "colour",
        }
    return out


def measure(inputs: AnalysisInputs) -> Measurement:
    # where the counterfactual forwards ran: does the rest of the image, object removed, carry the class?
    removed = removed_gaps(inputs.counterfactual)
    return {
        "global": colour_shifts(inputs.first, inputs.classes, inputs.thresholds.min_group),
        "global_removed_gap": removed,
    }


def _shift_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: shift its images toward the others' colour and back (keyed draws of images).
    Returns ``{"test": the shift test or None, "triage": reason or None}``."""
    assert inputs.intervener is not None
    t, first, r = params_of(inputs.thresholds, Params), inputs.first, measured["global"][cls]
    mine, rest, idx = first[first["label"] == cls], first[first["label"] != cls], inputs.classes.index(cls)
    method = inputs.hot_method
    if t.triage:
        reason = too_few_called(first, cls, t.min_group) or _probe(inputs, mine, rest, idx, r["delta"], method)
        if reason is not None:
            return {"test": None, "triage": reason}
    own = keyed_rows(mine, t.intervention_images, inputs.seed, "shift")
    other = keyed_rows(rest, t.intervention_images, inputs.seed, "shift")
    test = inputs.intervener.shift_test(np.sort(own).tolist(), np.sort(other).tolist(), idx, r["delta"], method)
    return {"test": test, "triage": None}


def _gather(measured: Measurement, results: dict[str, dict[str, Any]]) -> Measurement:
    out = {c: {**r, **({"test": results[c]["test"]} if results[c]["test"] is not None else {})}
           for c, r in measured["global"].items()}  # fmt: skip
    return {"global": out, "triage": {c: r["triage"] for c, r in results.items() if r["triage"] is not None}}


WORK = PerClass(
    classes=lambda measured, inputs: list(measured["global"]),
    run=_shift_class,
    gather=_gather,
    what="colour shifts, classes",
)


def _probe(
    inputs: AnalysisInputs, mine: pd.DataFrame, rest: pd.DataFrame, idx: int, delta: list[float], method: str | None
) -> str | None:
    """The triage probe: the whole-image shifts against their opposite controls, on the first ``PROBE_IMAGES``
    images of the class's and the others' keyed draws; why the full test is not run (None: it is)."""
    assert inputs.intervener is not None
    t = params_of(inputs.thresholds, Params)
    own = np.sort(keyed_rows(mine, PROBE_IMAGES, inputs.seed, "shift")).tolist()
    other = np.sort(keyed_rows(rest, PROBE_IMAGES, inputs.seed, "shift")).tolist()
    test = inputs.intervener.shift_test(own, other, idx, delta, method, outside=False)  # it reads the whole only
    return probe_reason("the shifts' effect", effects(test["whole"])[2], t.property_effect, len(own))


def effects(test: dict[str, Any]) -> tuple[float, float, float]:
    """``(leave effect, flip effect, min of both)``: shift minus control, for one test."""
    leave = test["leave"] - test["leave_control"]
    flip = test["flip"] - test["flip_control"]
    return float(leave), float(flip), float(min(leave, flip))


def _spared(r: dict[str, Any]) -> dict[str, Any]:
    """The test sparing the objects, the one a flag must pass (the whole image's where none ran)."""
    return r["test"]["outside"] or r["test"]["whole"]


def tests(measured: Measurement) -> dict[str, float]:
    """``{"shift/<class>": p}`` per class shifted: the larger of the paired sign tests (leave and flip, shift
    against its opposite control) of the test sparing the objects."""
    return {
        f"shift/{c}": max(_spared(r)["leave_p"], _spared(r)["flip_p"])
        for c, r in measured["global"].items()
        if "test" in r
    }


def _message(c: str, r: dict[str, Any]) -> str:
    t, out = r["test"]["whole"], r["test"].get("outside")
    shift = ", ".join(f"{ch[0].upper()} {v:+.2f}" for ch, v in zip(CHANNELS, r["delta"], strict=True))
    msg = (
        f"Shifting the {c} images' {r['property']} toward the other classes' ({shift}) makes {pct(t['leave'])} of "
        f"them stop being called {c} (the opposite shift: {pct(t['leave_control'])}); shifting other classes' "
        f"images toward {c}'s {r['property']} turns {pct(t['flip'])} of them into {c} (the opposite shift: "
        f"{pct(t['flip_control'])})"
    )
    if out:
        msg += (
            f". Sparing the objects ({pct(out['kept'])} of the pixels), the shifts still move {pct(out['leave'])} "
            f"and {pct(out['flip'])}: the cue lies outside the object too"
        )
    return msg + "."


def global_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``global_cue`` per class: the shifts beat their opposite controls by ``property_effect``, significantly,
    on the whole image *and* sparing the objects; the severity follows the whole-image effect. Where the
    counterfactual forwards ran (masks), the class must also survive the object's removal: a model whose
    prediction goes with the object is sensitive to background colour, not led by it, and is not flagged."""
    t = params_of(ctx.thresholds, Params)
    removed: dict[str, float] = measured.get("global_removed_gap", {})
    q = ctx.q_values("properties", tests(measured))
    flags = []
    for c, r in measured["global"].items():
        if "test" not in r:
            continue
        whole, spared, qv = r["test"]["whole"], _spared(r), q[f"shift/{c}"]
        if whole["n_own"] < t.min_group or whole["n_other"] < t.min_group:
            continue
        leave, flip, effect = effects(whole)
        outside = effects(spared)[2]
        if not (np.isfinite(effect) and np.isfinite(outside)) or min(effect, outside) < t.property_effect:
            continue
        gap = removed.get(c)
        if not qv < t.alpha or (gap is not None and gap < t.counterfactual_gap):
            continue  # with the object removed the class goes: the model is sensitive to colour, not led by it
        sev = "high" if effect >= t.property_high else "medium"
        evidence = {
            **r,
            "leave_effect": leave,
            "flip_effect": flip,
            "outside_effect": outside,
            "q_value": float(qv),
        }
        flags.append(make_flag("global_cue", c, r["property"], sev, effect, _message(c, r), evidence))
    return flags


def property_examples(
    finding: Finding, flags: Mapping[str, Flag], first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """The class's images shifted toward the other classes' colour, and one other image toward the class's."""
    cue = next(flags[i] for i in finding["flags"] if i in flags and flags[i]["kind"] == "global_cue")
    return shift_examples(finding, cue["evidence"]["delta"], first, ids, maker, n)


ANALYSIS = register_analysis(
    Analysis(
        examples=property_examples,
        name="properties",
        params=Params,
        kinds={"global_cue": Cause("property", leads=True)},
        needs=frozenset({"model"}),
        measure=measure,
        flag=global_flags,
        evidence_ids=(),
        per_class=WORK,
        tests=tests,
    )
)

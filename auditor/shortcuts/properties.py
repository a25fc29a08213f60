"""``global_cue``: the prediction follows a global image property (colour, brightness), no metadata needed.

Sky colour, illumination, a scanner's tint: a cue spread over the whole image has no region to remove.
It can be moved instead. Per class, the mean colour of its images (per channel, pixel space) is compared
with the other classes'; the class's images are shifted toward the others' colour and the others' toward
the class's (``interventions.shift_intervention``). Each shift has a control: the same shift in the
opposite direction, which changes the image as much but not toward the other side. The flag stands on
the *difference* between shift and control (``property_effect``): a model that any large colour change
breaks moves under both, a model that follows the property only under the shift toward the other side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from auditor.shortcuts.flags import Flag, make_flag, pct
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    keyed_rows,
    register_analysis,
)
from auditor.stats import bh_adjust

CHANNELS = ("red", "green", "blue")


def colour_shifts(first: Any, classes: list[str], min_group: int) -> dict[str, Any]:
    """Per class: ``delta`` = other classes' mean colour minus the class's, its size and what it changes.

    Returns:
        ``{class: {n, delta [3], size, property}}``; ``property`` = ``brightness`` when the shift runs mostly
        along the grey axis (its grey component >= 0.8 of its length), else ``colour``.
    """
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
    return {"global": colour_shifts(inputs.first, inputs.classes, inputs.thresholds.min_group)}


def intervene(measured: Measurement, inputs: AnalysisInputs) -> Measurement:
    """Shift each class's images toward the others' colour and back (keyed draws of images)."""
    assert inputs.intervener is not None
    t, first = inputs.thresholds, inputs.first
    out = {}
    for cls, r in measured["global"].items():
        own = keyed_rows(first[first["label"] == cls], t.intervention_images, inputs.seed, "shift")
        other = keyed_rows(first[first["label"] != cls], t.intervention_images, inputs.seed, "shift")
        test = inputs.intervener.shift_test(
            np.sort(own).tolist(), np.sort(other).tolist(), inputs.classes.index(cls), r["delta"]
        )
        out[cls] = {**r, "test": test}
    return {"global": out}


def _message(c: str, r: dict[str, Any]) -> str:
    t = r["test"]
    shift = ", ".join(f"{ch[0].upper()} {v:+.2f}" for ch, v in zip(CHANNELS, r["delta"], strict=True))
    return (
        f"Shifting the {c} images' {r['property']} toward the other classes' ({shift}) makes {pct(t['leave'])} of "
        f"them stop being called {c} (the opposite shift: {pct(t['leave_control'])}); shifting other classes' "
        f"images toward {c}'s {r['property']} turns {pct(t['flip'])} of them into {c} (the opposite shift: "
        f"{pct(t['flip_control'])})."
    )


def global_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``global_cue`` per class: both shifts beat their controls by ``property_effect``, significantly."""
    t = ctx.thresholds
    tested = [(c, r) for c, r in measured["global"].items() if "test" in r]
    q = bh_adjust([max(r["test"]["leave_p"], r["test"]["flip_p"]) for _, r in tested])
    flags = []
    for (c, r), qv in zip(tested, q, strict=True):
        test = r["test"]
        if test["n_own"] < t.min_group or test["n_other"] < t.min_group:
            continue
        leave = test["leave"] - test["leave_control"]
        flip = test["flip"] - test["flip_control"]
        effect = min(leave, flip)
        if not (np.isfinite(effect) and effect >= t.property_effect and qv < t.alpha):
            continue
        sev = "high" if effect >= t.property_high else "medium"
        evidence = {**r, "leave_effect": float(leave), "flip_effect": float(flip), "q_value": float(qv)}
        flags.append(make_flag("global_cue", c, r["property"], sev, effect, _message(c, r), evidence))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        name="properties",
        kinds=("global_cue",),
        needs=frozenset({"model"}),
        measure=measure,
        flag=global_flags,
        evidence_ids=(),
        intervene=intervene,
    )
)

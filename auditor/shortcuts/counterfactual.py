"""``counterfactual_background``: with the object removed, the class's own background still calls the class.

The measurement is :func:`auditor.shortcuts.removals.counterfactual_summary` (shared with the analyses that
check their evidence against it); this module judges it.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator

from auditor.shortcuts.examples import object_removed_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, level, make_flag, pct
from auditor.shortcuts.registry import Analysis, AnalysisInputs, FlagContext, Measurement, register_analysis
from auditor.shortcuts.thresholds import SharedParams, ordered, params_of


class Params(SharedParams):
    """``counterfactual_background``'s severity levels (config ``thresholds``, flat keys); its least gap,
    ``counterfactual_gap``, is shared."""

    counterfactual_medium: float = Field(0.3, gt=0, le=1, description="medium from this gap")
    counterfactual_high: float = Field(0.5, gt=0, le=1, description="high from this gap")

    @model_validator(mode="after")
    def _counterfactual_levels_in_order(self) -> Self:  # a unique name: Thresholds inherits every analysis's
        ordered(self, "counterfactual_gap", "counterfactual_medium", "counterfactual_high")
        return self


def measure(inputs: AnalysisInputs) -> Measurement:
    return {"counterfactual": inputs.counterfactual}  # removals.counterfactual_summary, shared with other analyses


def _message(c: str, r: dict[str, Any]) -> str:
    exact = r["versions"].get("bg", {}).get("self")
    msg = (
        f"With the object removed (with a margin, as a box and as a flat silhouette), the {c} images the model "
        f"recognises are still called {c} at least {pct(r['bg_only_self'])} of the time (images it does not call "
        f"{c}, same removal: {pct(r['bg_only_other'])})"
    )
    if exact is not None and r["weakest"] != "bg":
        msg += f"; exact-mask removal: {pct(exact)}"
    return msg + (
        f"; {c} objects pasted on another class's background are recognised {pct(r['mixed_accuracy'])} of the "
        f"time (originals: {pct(r['accuracy'])})."
    )


def tests(measured: Measurement) -> dict[str, float]:
    """``{class: p}``: the Fisher test of the weakest usable removal, per measurable class."""
    return {c: r["p_value"] for c, r in measured["counterfactual"].items() if r["measurable"]}


def counterfactual_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``counterfactual_background``: the class's own background, object removed with a margin every way,
    still calls the class more often than other classes' backgrounds do (by ``counterfactual_gap``)."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("counterfactual", tests(measured))
    flags = []
    for c, r in measured["counterfactual"].items():
        if not r["measurable"]:
            continue
        qv = q[c]
        gap = r["bg_only_self"] - r["bg_only_other"]
        if r["n"] < t.min_group or r.get("n_null", t.min_group) < t.min_group:
            continue
        if gap < t.counterfactual_gap or not qv < t.alpha:
            continue
        sev = level(gap, t.counterfactual_medium, t.counterfactual_high)
        flags.append(
            make_flag("counterfactual_background", c, None, sev, gap, _message(c, r), {**r, "q_value": float(qv)})
        )
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=object_removed_examples,
        name="counterfactual",
        params=Params,
        kinds={"counterfactual_background": Cause("background", leads=True)},
        needs=frozenset({"masks", "counterfactuals"}),
        measure=measure,
        flag=counterfactual_flags,
        evidence_ids=("ids",),
        tests=tests,
    )
)

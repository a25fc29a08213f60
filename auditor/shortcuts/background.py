"""``background_reliance``: a class whose maps put less mass on the object than a uniform map would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy import stats

from auditor.shortcuts.examples import object_removed_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, level, make_flag, pct
from auditor.shortcuts.registry import Analysis, AnalysisInputs, FlagContext, Measurement, register_analysis
from auditor.shortcuts.removals import removed_gaps
from auditor.shortcuts.thresholds import SharedParams, ordered, params_of
from auditor.stats import NAN, median_ci


class Params(SharedParams):
    """``background_reliance``'s thresholds (config ``thresholds``, flat keys)."""

    background_ratio: float = Field(
        1.0,
        gt=0,
        description="flag when the CI of the median mass-on-object / chance ratio lies below this (1 = a uniform map)",
    )
    background_medium: float = Field(0.8, gt=0, description="medium at or below this ratio")
    background_high: float = Field(0.5, gt=0, description="high at or below this ratio")

    @model_validator(mode="after")
    def _background_levels_in_order(self) -> Self:  # a unique name: Thresholds inherits every analysis's
        ordered(self, "background_high", "background_medium", "background_ratio")
        return self


def background_reliance(table: pd.DataFrame, classes: Sequence[str], seed: int = 0, worst: int = 6) -> dict[str, Any]:
    """Per class: how the map's mass on the object compares with a uniform map's (its chance level).

    ``ratio = energy_in_mask / a`` (``a`` = object area fraction): 1 = what a uniform map gives, < 1 = the
    map prefers the background, > 1 = it prefers the object (a clean model, even with blurry CAMs).

    Args:
        table: rows of one method and the ``label`` target, with ``energy_in_mask`` and its chance.
        classes: class names.
        seed: bootstrap seed.
        worst: how many worst-offending sample ids to keep.

    Returns:
        ``{class: {n, median_ratio, ci_low, ci_high, p_value, outside, chance_outside, worst_ids, worst_values}}``
        where ``p_value`` is a one-sided Wilcoxon signed-rank test of ``ratio < 1``.
    """
    out: dict[str, Any] = {}
    if not {"energy_in_mask", "energy_in_mask_chance"} <= set(table.columns):
        return out  # no masks or boxes anywhere in the run
    for cls in classes:
        sub = table[(table["label"] == cls) & table["energy_in_mask"].notna()]
        sub = sub[sub["energy_in_mask_chance"] > 0]
        if len(sub) < 3:
            continue
        ratio = (sub["energy_in_mask"] / sub["energy_in_mask_chance"]).to_numpy(np.float64)
        low, high = median_ci(ratio, seed)
        diff = ratio - 1
        p = float(stats.wilcoxon(diff, alternative="less").pvalue) if np.any(diff != 0) else 1.0
        order = np.argsort(ratio)[:worst]
        out[cls] = {
            "n": len(sub),
            "median_ratio": float(np.median(ratio)),
            "ci_low": low,
            "ci_high": high,
            "p_value": p,
            "outside": float(sub["energy_outside_mask"].median()) if "energy_outside_mask" in sub else NAN,
            "chance_outside": float((1 - sub["energy_in_mask_chance"]).median()),
            "worst_ids": sub["id"].to_numpy()[order].tolist(),
            "worst_values": ratio[order].tolist(),
        }
    return out


def measure(inputs: AnalysisInputs) -> Measurement:
    per_method = {
        m: background_reliance(inputs.table[inputs.table["method"] == m], inputs.classes, inputs.seed)
        for m in inputs.methods
    }
    # where the counterfactual forwards ran: does the background alone carry the class? (the maps only say
    # where the model looks; removing the object says whether it matters)
    removed = removed_gaps(inputs.counterfactual)
    return {"background": per_method, "background_removed_gap": removed}


def _message(cls: str, r0: dict[str, Any], ratio: float) -> str:
    outside = "an unknown share" if not np.isfinite(r0["outside"]) else pct(r0["outside"])
    return (
        f"{outside} of the {cls} class's attention falls outside the object, where a uniform map "
        f"would put {pct(r0['chance_outside'])}: the object gets {ratio:.2f}x its fair share of attention."
    )


def tests(measured: Measurement) -> dict[str, float]:
    """``{"<method>/<class>": p}``: the Wilcoxon test of the mass-on-object ratio below 1."""
    return {f"{m}/{c}": r["p_value"] for m, per_class in measured["background"].items() for c, r in per_class.items()}


def background_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``background_reliance`` per class, merged over the methods that support it.

    The maps say where the model looks, not what it uses. Where the counterfactual forwards ran, a class
    is flagged only if its background alone, object removed with a margin, still calls it
    (``counterfactual_gap`` above the other classes' rate); without them the flag is at most medium.
    """
    t = params_of(ctx.thresholds, Params)
    per_method: dict[str, dict[str, Any]] = measured["background"]
    q = ctx.q_values("background", tests(measured))
    hits: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for m, per_class in per_method.items():
        for c, r in per_class.items():
            if r["n"] >= t.min_group and r["ci_high"] < t.background_ratio and q[f"{m}/{c}"] < t.alpha:
                hits.setdefault(c, []).append((m, r))
    removed: dict[str, float] = measured.get("background_removed_gap", {})
    flags = []
    for c, support in hits.items():
        gap = removed.get(c)
        if gap is not None and gap < t.counterfactual_gap:
            continue  # removing the object (with a margin) makes the model drop the class: no shortcut
        reliable = [(m, r) for m, r in support if m not in ctx.unreliable] or support
        ratio = float(np.median([r["median_ratio"] for _, r in reliable]))
        r0 = reliable[0][1]
        sev = level(ratio, t.background_medium, t.background_high, smaller_is_worse=True)
        if gap is None and sev == "high":
            sev = "medium"  # the maps alone, no intervention: never high
        keys = ("n", "median_ratio", "ci_low", "ci_high", "p_value", "outside", "chance_outside")
        evidence = {
            "median_ratio": ratio,
            "by_method": {m: {k: r[k] for k in keys} for m, r in support},
            "worst_ids": r0["worst_ids"],
            "removed_gap": gap,
        }
        methods = [m for m, _ in support]
        flags.append(
            make_flag(
                "background_reliance",
                c,
                None,
                sev,
                1 - ratio,
                _message(c, r0, ratio),
                evidence,
                methods,
            )
        )
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=object_removed_examples,
        name="background",
        params=Params,
        kinds={"background_reliance": Cause("background")},
        needs=frozenset({"maps", "masks"}),
        measure=measure,
        flag=background_flags,
        evidence_ids=("worst_ids",),
        tests=tests,
    )
)

"""``counterfactual_background``: with the object removed, the class's own background still calls the class.

The map stage ran the counterfactual forwards (``cf_*`` columns: foreground only, background only, the
object on another class's background) on a stratified subset of images with masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from scipy import stats

from auditor.shortcuts.flags import Flag, level, make_flag, pct
from auditor.shortcuts.registry import Analysis, AnalysisInputs, FlagContext, Measurement, register_analysis
from auditor.stats import NAN, bh_adjust


def counterfactual_summary(first: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Per class: predictions on foreground-only, background-only and background-swapped images.

    ``bg_only_self`` = share of the class's background-only images still predicted as the class;
    ``bg_only_other`` = share of the other classes' background-only images predicted as this class (what
    an uninformative background gets); their difference is direct evidence that the background is used.
    ``mixed_accuracy`` = the class's objects on another class's background, recognised; ``bg_gap`` =
    original accuracy minus that.

    Returns:
        ``{class: {n, accuracy, fg_only_accuracy, bg_only_self, bg_only_other, mixed_accuracy, mixed_follows_bg,
        bg_gap, p_value, ids}}``; ``p_value``: one-sided Fisher exact test ``bg_only_self > bg_only_other``.
    """
    if "cf_bg_pred" not in first.columns:
        return {}
    rows = first[first["cf_bg_pred"] != ""]
    out: dict[str, Any] = {}
    for cls in classes:
        own, other = rows[rows["label"] == cls], rows[rows["label"] != cls]
        if len(own) < 3 or len(other) < 3:
            continue
        self_hits = int((own["cf_bg_pred"] == cls).sum())
        other_hits = int((other["cf_bg_pred"] == cls).sum())
        mixed = own[own["cf_mix_pred"] != ""]
        p = float(
            stats.fisher_exact(
                [[self_hits, len(own) - self_hits], [other_hits, len(other) - other_hits]], alternative="greater"
            ).pvalue
        )
        acc = float(own["correct"].mean())
        mixed_acc = float((mixed["cf_mix_pred"] == cls).mean()) if len(mixed) else NAN
        out[cls] = {
            "n": len(own),
            "accuracy": acc,
            "fg_only_accuracy": float((own["cf_fg_pred"] == cls).mean()),
            "bg_only_self": self_hits / len(own),
            "bg_only_other": other_hits / len(other),
            "mixed_accuracy": mixed_acc,
            "mixed_follows_bg": float((mixed["cf_mix_pred"] == mixed["cf_mix_bg_label"]).mean()) if len(mixed) else NAN,
            "bg_gap": acc - mixed_acc if len(mixed) else NAN,
            "p_value": p,
            "ids": own[own["cf_bg_pred"] == cls]["id"].head(6).tolist(),
        }
    return out


def measure(inputs: AnalysisInputs) -> Measurement:
    return {"counterfactual": counterfactual_summary(inputs.first, inputs.classes)}


def counterfactual_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``counterfactual_background``: the class's own background, object removed, still calls the class."""
    t = ctx.thresholds
    items = list(measured["counterfactual"].items())
    q = bh_adjust([r["p_value"] for _, r in items])
    flags = []
    for (c, r), qv in zip(items, q, strict=True):
        gap = r["bg_only_self"] - r["bg_only_other"]
        if r["n"] < t.min_group or gap < t.counterfactual_gap or not qv < t.alpha:
            continue
        sev = level(gap, t.counterfactual_medium, t.counterfactual_high)
        msg = (
            f"With the object removed, {c} images are still called {c} {pct(r['bg_only_self'])} of the time "
            f"(other classes' backgrounds: {pct(r['bg_only_other'])}); {c} objects pasted on another class's "
            f"background are recognised {pct(r['mixed_accuracy'])} of the time (originals: {pct(r['accuracy'])})."
        )
        flags.append(make_flag("counterfactual_background", c, None, sev, gap, msg, {**r, "q_value": float(qv)}))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        name="counterfactual",
        kinds=("counterfactual_background",),
        needs=frozenset({"masks", "counterfactuals"}),
        measure=measure,
        flag=counterfactual_flags,
        evidence_ids=("ids",),
    )
)

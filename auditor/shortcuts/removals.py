"""The object removed: the counterfactual forwards' evidence, shared by several analyses.

The map stage ran the counterfactual forwards (``cf_*`` columns: foreground only, background only four
ways, the object on another class's background) on a stratified subset of images with masks.
:func:`counterfactual_summary` reads them per class; ``counterfactual_background`` flags on it, and
``background_reliance`` and ``global_cue`` check their map or colour evidence against it
(:func:`removed_gaps`). It lives apart from every analysis so that no analysis imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from scipy import stats

from auditor.stats import NAN

REMOVALS = ("bg_margin", "bg_box", "bg_flat")  # the versions a flag must survive (``bg`` = exact mask: evidence)


MIN_NULL = 5  # fewest images a null rate is read from


def _rates(rows: pd.DataFrame, cls: str, version: str) -> dict[str, Any]:
    """Self / other call rates of one background-only version and the one-sided Fisher test between them.

    The null is read from the images the model does not call the class; when fewer than ``MIN_NULL``
    exist (a model that calls nearly everything the class), from the other classes' images instead.
    """
    col = rows[f"cf_{version}_pred"]
    own = (rows["label"] == cls) & (rows["pred"] == cls)
    rest, null = rows["pred"] != cls, "prediction"
    if int(rest.sum()) < MIN_NULL:
        rest, null = rows["label"] != cls, "label"
    self_hits, other_hits = int((col[own] == cls).sum()), int((col[rest] == cls).sum())
    n_own, n_other = int(own.sum()), int(rest.sum())
    table = [[self_hits, n_own - self_hits], [other_hits, n_other - other_hits]]
    return {
        "self": self_hits / max(n_own, 1),
        "other": other_hits / max(n_other, 1),
        "gap": self_hits / max(n_own, 1) - other_hits / max(n_other, 1),
        "p_value": float(stats.fisher_exact(table, alternative="greater").pvalue),
        "n_null": n_other,
        "null": null,
    }


def _kept(own: pd.DataFrame, version: str) -> float:
    """The median share of the image a removal version leaves among the class's images (1 for runs that
    predate the ``cf_<version>_kept`` columns)."""
    col = f"cf_{version}_kept"
    return float(own[col].median()) if col in own.columns and own[col].notna().any() else 1.0


def counterfactual_summary(first: pd.DataFrame, classes: Sequence[str], min_kept: float = 0.25) -> dict[str, Any]:
    """Per class: predictions on foreground-only, background-only and background-swapped images.

    For each background-only version (object removed by exact mask ``bg``, with a margin ``bg_margin``, as
    a box ``bg_box``, as a flat silhouette ``bg_flat``; see ``probes.counterfactuals``): ``self`` = share
    of the class's images the model recognises that are still predicted as the class; ``other`` = share
    of the images the model does *not* call the class that, given the same removal, are predicted as it:
    the null, what a background that did not make the model say the class gets; ``gap`` = self - other.
    Conditioning on the prediction (not only the label) keeps the test right when the audit set does not
    carry the cue for every image: backgrounds that call the class wherever they occur still show.
    The class's evidence is its *weakest* version among the margin removals (``weakest``). Each removal
    can leak something of the object: the exact mask leaves the rim of an imperfect mask, inpainting can
    carry that rim's colour into the hole, a silhouette (``bg_flat``) keeps the object's shape, and a box
    (``bg_box``) removes some background with it. A background that carries the class survives all of
    the margin removals; a leak rarely fakes all three.
    ``mixed_accuracy`` = the class's objects on another class's background, recognised; ``bg_gap`` =
    original accuracy minus that.

    A removal of a large object can take nearly the whole image (the margin's box of an object covering 40%
    of the frame covers ~all of it): nothing is left to inpaint from or to carry a cue, and the class
    "vanishes" whatever the model uses. A version that leaves under ``min_kept`` of the image (median over
    the class's images) is not used; a class with no usable margin version is ``measurable: False`` and
    neither flags nor vetoes another analysis.

    Returns:
        ``{class: {n, accuracy, fg_only_accuracy, versions: {version: {self, other, gap, p_value}}, kept:
        {version: median share left}, usable, measurable, weakest, bg_only_self, bg_only_other, gap, p_value,
        mixed_accuracy, mixed_follows_bg, bg_gap, ids}}`` where the top-level ``bg_only_*``, ``gap`` and
        ``p_value`` are the weakest usable version's (absent when not measurable).
    """
    if "cf_bg_pred" not in first.columns:
        return {}
    rows = first[first["cf_bg_pred"] != ""]
    versions = [v for v in ("bg", *REMOVALS) if f"cf_{v}_pred" in rows.columns]
    margins = [v for v in REMOVALS if v in versions] or ["bg"]
    out: dict[str, Any] = {}
    for cls in classes:
        own, other = rows[rows["label"] == cls], rows[rows["label"] != cls]
        recognised = int((own["pred"] == cls).sum())
        if recognised < 3 or len(other) < 3:
            continue
        rates = {v: _rates(rows, cls, v) for v in versions}
        kept = {v: _kept(own, v) for v in versions}
        usable = [v for v in margins if kept[v] >= min_kept]
        acc = float(own["correct"].mean())
        head = {
            "n": recognised,
            "accuracy": acc,
            "fg_only_accuracy": float((own["cf_fg_pred"] == cls).mean()),
            "versions": rates,
            "kept": kept,
            "usable": usable,
            "measurable": bool(usable),
        }
        if not usable:
            out[cls] = head
            continue
        weakest = min(usable, key=lambda v: (rates[v]["gap"], -rates[v]["p_value"]))
        mixed = own[own["cf_mix_pred"] != ""]
        mixed_acc = float((mixed["cf_mix_pred"] == cls).mean()) if len(mixed) else NAN
        still = own[own[f"cf_{weakest}_pred"] == cls]
        out[cls] = {
            **head,
            "weakest": weakest,
            "bg_only_self": rates[weakest]["self"],
            "bg_only_other": rates[weakest]["other"],
            "n_null": rates[weakest]["n_null"],
            "gap": rates[weakest]["gap"],
            "p_value": rates[weakest]["p_value"],
            "mixed_accuracy": mixed_acc,
            "mixed_follows_bg": float((mixed["cf_mix_pred"] == mixed["cf_mix_bg_label"]).mean()) if len(mixed) else NAN,
            "bg_gap": acc - mixed_acc if len(mixed) else NAN,
            "ids": still["id"].head(6).tolist(),
        }
    return out


def removed_gaps(summary: dict[str, Any]) -> dict[str, float]:
    """Per class, the counterfactual's weakest-version gap: does the rest of the image, object removed with
    a margin, still carry the class? (empty without masks; a class whose removals leave too little of the
    image is absent: it vetoes nothing)."""
    return {c: r["gap"] for c, r in summary.items() if r["measurable"]}

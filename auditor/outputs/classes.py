"""The report's class section: the classes in the order a reader needs them (those flags name first), a card per
class for the first ``CARDS`` (metric bars against chance, mean deletion/insertion curves, the hotspot grid),
and with more classes a row per class for the sortable, filterable table; the triage's left-out classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from auditor.outputs.render import data_uri
from auditor.store.rundir import RunDir


def _curve_points(curve: np.ndarray, width: int = 220, height: int = 90) -> str:
    xs = np.linspace(0, width, len(curve))
    ys = height - np.clip(curve, 0, 1) * height
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))


def _heat(diff: list[list[float]]) -> str:
    """The hotspot grid (where a class's maps exceed the other classes': red; fall short: blue; under 5% of the
    peak: the grey background) as a PNG data URI at one pixel per cell (the page scales it up, pixelated): a
    1,024-rectangle SVG per class made a 100-class report 7 MB."""
    d = np.nan_to_num(np.asarray(diff, np.float64))
    peak = float(np.abs(d).max()) or 1.0
    v = d / peak
    alpha = np.where(np.abs(v) < 0.05, 0.0, np.clip(np.abs(v), 0, 1))[..., None]
    colour = np.where((v > 0)[..., None], np.array([0xC0, 0x39, 0x2B]), np.array([0x2E, 0x6D, 0xB4]))
    image = alpha * colour + (1 - alpha) * np.array([0xF4, 0xF4, 0xF4])
    return data_uri(image.round().astype(np.uint8), "PNG")


CHARTED_BEFORE = ("energy_in_mask", "pointing_game", "relevance_rank_accuracy", "insertion_auc", "deletion_auc")


def charted(summary: dict[str, Any]) -> list[str]:
    """The metrics the class cards chart: those the metric registry marks ``charted`` (``summary.metric_columns``);
    for a run written before the mark, the ones charted then."""
    columns = summary.get("metric_columns") or {}
    if any("charted" in info for info in columns.values()):
        return [c for c, info in columns.items() if info.get("charted")]
    return list(CHARTED_BEFORE)


def _bars(stats: dict[str, Any], metrics: list[str]) -> list[dict[str, Any]]:
    bars = []
    for metric in metrics:
        s = stats.get(metric)
        if s and s.get("mean") is not None:
            chance = (stats.get(f"{metric}_chance") or {}).get("mean")
            bars.append(
                {
                    "metric": metric,
                    "mean": s["mean"],
                    "lo": s["ci_low"],
                    "hi": s["ci_high"],
                    "n": s["n"],
                    "chance": chance,
                }
            )
    return bars


CARDS = 40  # classes with a card (flagged classes first); with more classes, every class is a row of a table
CONCEPT_CLASSES = 20  # classes whose concepts the report shows (flagged classes first); the rest in summary.json


def class_order(classes: list[str], flags: list[dict[str, Any]]) -> list[str]:
    """The classes that flags name (most severe flag first, as ``flags.json`` orders them), then the others in
    model order: the classes a reader must look at come first however many there are."""
    named = [f["class"] for f in flags if f.get("class") in classes]
    return list(dict.fromkeys(named + list(classes)))


def class_rows(summary: dict[str, Any], flags: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """One row per class for the sortable, filterable table: images, accuracy, flags (count, most severe),
    hotspot place and lift, the analyses the triage left out."""
    analyses = summary.get("analyses") or {}
    hotspots = (analyses.get("hotspots") or {}).get(primary, {})
    triage = analyses.get("triage") or {}
    rank = {"high": 3, "medium": 2, "low": 1}
    out = []
    for cls in class_order(summary["dataset"]["classes"], flags):
        mine = [f for f in flags if f.get("class") == cls]
        acc, hot = summary["accuracy"].get(cls, {}), hotspots.get(cls) or {}
        top = max((f["severity"] for f in mine), key=lambda v: rank.get(v, 0), default="")
        out.append(
            {
                "cls": cls,
                "n": acc.get("n", 0),
                "accuracy": acc.get("accuracy"),
                "flags": len(mine),
                "severity": top,
                "rank": rank.get(top, 0),
                "hotspot": hot.get("location", ""),
                "lift": hot.get("lift"),
                "triaged": ", ".join(a for a, per in triage.items() if cls in per),
            }
        )
    return out


def class_cards(
    run: RunDir, summary: dict[str, Any], rows: pd.DataFrame, primary: str, target: str, classes: list[str]
) -> list:
    """Per class of ``classes``: accuracy, metric bars against chance, mean deletion/insertion curves, the
    hotspot heat map."""
    agg = summary["aggregates"].get(primary, {}).get(target, {})
    hotspots = ((summary.get("analyses") or {}).get("hotspots") or {}).get(primary, {})
    metrics = charted(summary)
    cards = []
    for cls in classes:
        acc = summary["accuracy"].get(cls, {})
        curves = []
        for kind in ("deletion", "insertion"):
            stored = run.load_curves(f"{kind}_curve", primary, target)
            if stored is not None:
                arr = np.asarray(stored[rows[rows["label"] == cls]["row"].to_numpy()], np.float64)
                arr = arr[np.isfinite(arr).all(1)]
                if len(arr):
                    curves.append({"kind": kind, "points": _curve_points(arr.mean(0)), "n": len(arr)})
        hot = hotspots.get(cls)
        cards.append(
            {
                "cls": cls,
                "accuracy": acc.get("accuracy"),
                "n": acc.get("n", 0),
                "bars": _bars(agg.get(cls, {}), metrics),
                "curves": curves,
                "heat": _heat(hot["diff"]) if hot and "diff" in hot else None,
                "hot": {k: hot[k] for k in ("location", "lift", "persistence")} if hot else None,
            }
        )
    return cards


TRIAGE_ROWS = 300  # classes x analyses listed in the report; summary.json holds them all


def triage_rows(triage: dict[str, dict[str, str]]) -> list[dict[str, str]]:
    """``analyses.triage`` as rows (class, analysis, reason), by class, the first ``TRIAGE_ROWS``."""
    rows = [{"class": c, "analysis": a, "reason": r} for a, per in triage.items() for c, r in per.items()]
    return sorted(rows, key=lambda r: (r["class"], r["analysis"]))[:TRIAGE_ROWS]

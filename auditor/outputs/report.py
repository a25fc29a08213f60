"""``report.html``: one self-contained page rendered only from a run's saved results (``auditor report RUN``).

Python prepares numbers and inline images; the jinja2 template (autoescape on, StrictUndefined) draws every
chart as inline SVG. Nothing is fetched: no CDN, no ``fetch()``, images are data URIs, galleries are capped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from scipy import ndimage

from auditor.errors import ConfigError
from auditor.ops import resize_bilinear
from auditor.outputs.classes import CARDS, CONCEPT_CLASSES, class_cards, class_order, class_rows, triage_rows
from auditor.outputs.gate import evaluate, load_run, verdict
from auditor.outputs.render import colour_scale, data_uri, environment, grey, overlay, thumbnail
from auditor.outputs.rules import load_rules
from auditor.shortcuts.catalog import evidence_ids, evidence_keys
from auditor.store.rundir import DEEPDIVE, EXPENSIVE, REPORT, SUMMARY, RunDir, atomic_write_bytes, one_row_per_sample

log = logging.getLogger(__name__)

GALLERY = 6  # images per flag
THUMB = 112
MAX_FLAGS = 20
MAX_COVERAGE_IDS = 300  # expensive-subset ids listed in the report (all are in expensive.json)
HEADLINES = {
    "fail": "Shortcut evidence found",
    "warn": "Possible shortcuts: review the findings",
    "pass": "No shortcut found",
    "inconclusive": "Inconclusive",
}


def inconclusive_reasons(summary: dict[str, Any]) -> list[str]:
    """Why a run that no rule fails still cannot say "no shortcut": the model does not beat guessing, or no
    analysis that confirms a shortcut by intervening on the images (the region scan, the colour shifts, the
    counterfactual with masks, a hotspot's removal) ran. Empty when the run can speak."""
    reasons = []
    counts = [int(v) for v in ((summary.get("dataset") or {}).get("per_class") or {}).values()]
    acc = (summary.get("accuracy") or {}).get("*") or {}
    if sum(counts) and acc.get("ci_low") is not None:
        guess = max(counts) / sum(counts)
        if acc["ci_low"] <= guess:
            reasons.append(
                f"the model's accuracy ({acc['accuracy']:.3f}, 95% CI from {acc['ci_low']:.3f}) does not beat always "
                f"answering the most common class ({guess:.3f}): a model that learned nothing has no shortcut to find"
            )
    an = summary.get("analyses") or {}
    counterfactual = an.get("counterfactual") or {}  # a class whose removals leave too little image was not tested
    tested = (
        bool(an.get("cues"))
        or any(isinstance(r, dict) and r.get("test") for r in (an.get("global") or {}).values())
        or any(isinstance(r, dict) and r.get("n") and r.get("measurable", True) for r in counterfactual.values())
        or bool(an.get("interventions"))
    )
    if not tested:
        reasons.append(
            "no analysis that tests a shortcut by intervening on the images ran (no masks for the counterfactual, "
            "the region scan off or too few images a class, no colour shift)"
        )
    return reasons


def report_verdict(out: str | Path) -> str:
    """The headline the report of the run in ``out`` opens with (``No shortcut found``, ...)."""
    run = RunDir(out)
    return _verdict(run.read_json(SUMMARY), run.read_flags())[1]


def _verdict(summary: dict[str, Any], flags: list[dict[str, Any]]) -> tuple[str, str, list[str]]:
    """``(status, headline, deciding rules)`` from the same rules as ``auditor gate`` (no baseline).

    The rules are the config's ``gates:`` file, else the packaged default rules; a rules file that can
    no longer be read (the report re-rendered elsewhere) falls back to the defaults with a warning.
    """
    path = (summary.get("config") or {}).get("gates")
    try:
        rules, _ = load_rules(Path(path) if path else None)
        checks = evaluate(rules, summary, flags)
    except ConfigError as err:
        log.warning("the report's verdict uses the packaged default rules: %s", err)
        rules, _ = load_rules(None)
        checks = evaluate(rules, summary, flags)
    status = verdict(checks)
    deciding = [c for c in checks if c.status in ("FAIL", "ERROR", "WARN")]
    flag_rules = {r.label for r in rules if r.kind in ("flags", "new_flags")}
    headline = HEADLINES[status]
    if status == "fail" and not any(c.status in ("FAIL", "ERROR") and c.rule in flag_rules for c in deciding):
        headline = "The gate fails"
    why = inconclusive_reasons(summary) if status == "pass" else []
    if why:  # "No shortcut found" in green would claim what the run could not test
        return "inconclusive", f"{HEADLINES['inconclusive']}: {'; '.join(why)}", []
    return status, headline, list(dict.fromkeys(f"{c.status}: {c.rule}" for c in deciding))


def _outline(objects: np.ndarray | None, row: int, size: int) -> np.ndarray | None:
    """``[size, size]`` bool outline of the object from the stored 32 x 32 object grid, or None."""
    if objects is None or not np.isfinite(objects[row]).all():
        return None
    inside = resize_bilinear(np.asarray(objects[row], np.float32), (size, size)) > 0.5
    eroded = ndimage.binary_erosion(inside, np.ones((3, 3), bool), border_value=1)
    return np.asarray(inside & ~eroded)


def _mask_image(objects: np.ndarray | None, row: int, size: int) -> np.ndarray | None:
    if objects is None or not np.isfinite(objects[row]).all():
        return None
    return np.where(grey(objects[row], size) > 127, 255, 0).astype(np.uint8)


def _tile(
    row: pd.Series, maps: np.ndarray | None, objects: np.ndarray | None, region: list[float] | None
) -> dict[str, Any]:
    """A gallery tile: the map over the image (object outlined), plus the image and the mask for the toggle."""
    img = thumbnail(Path(row["path"]), THUMB)
    over = overlay(img, maps[int(row["row"])]) if maps is not None else img.copy()
    edge = _outline(objects, int(row["row"]), THUMB)
    if edge is not None:
        over[edge] = (255, 255, 255)
    mask = _mask_image(objects, int(row["row"]), THUMB)
    views = [data_uri(over, "JPEG"), data_uri(img, "JPEG")] + ([data_uri(mask, "PNG")] if mask is not None else [])
    return {
        "id": row["id"],
        "label": row["label"],
        "pred": row["pred"],
        "overlay": views[0],
        "views": "|".join(views),
        "box": [v * THUMB for v in region] if region else None,
    }


def _deep_dive(run: RunDir, table: pd.DataFrame, target: str, objects: np.ndarray | None) -> list[dict[str, Any]]:
    """Per flagged sample: every method's map, guided backprop, occlusion and the top feature maps."""
    if not run.has(DEEPDIVE) or not run.deepdive_arrays_path.exists():
        return []
    meta = run.read_json(DEEPDIVE)
    arrays = np.load(run.deepdive_arrays_path)
    first = one_row_per_sample(table).set_index("id")
    methods = sorted(str(m) for m in table["method"].dropna().unique())
    out = []
    for i, (sid, row) in enumerate(zip(meta["ids"], meta["rows"], strict=True)):
        info = first.loc[sid]
        img = thumbnail(Path(info["path"]), THUMB)
        views: list[dict[str, str]] = [{"name": "image", "src": data_uri(img, "JPEG")}]
        mask = _mask_image(objects, row, THUMB)
        if mask is not None:
            views.append({"name": "object mask", "src": data_uri(mask, "PNG")})
        for m in methods:
            stored = run.load_maps(m, target)
            if stored is not None:
                low = stored[row]
                if np.isfinite(low).all():
                    views.append({"name": m, "src": data_uri(overlay(img, low), "JPEG")})
        if "occlusion" in arrays:
            views.append({"name": "occlusion", "src": data_uri(overlay(img, arrays["occlusion"][i]), "JPEG")})
        if "guided_backprop" in arrays:
            views.append(
                {"name": "guided backprop", "src": data_uri(grey(arrays["guided_backprop"][i], THUMB), "JPEG")}
            )
        features = []
        if "feature_maps" in arrays:
            for k in range(arrays["feature_maps"].shape[1]):
                features.append(
                    {
                        "channel": int(arrays["feature_channels"][i][k]),
                        "weight": float(arrays["feature_weights"][i][k]),
                        "src": data_uri(grey(arrays["feature_maps"][i][k], 56), "PNG"),
                    }
                )
        out.append(
            {
                "id": sid,
                "label": info["label"],
                "pred": info["pred"],
                "views": views,
                "features": features,
                "layer": meta.get("layer"),
                "notes": meta.get("notes", {}),
            }
        )
    return out


def _flag_cards(
    flags: list[dict[str, Any]], rows: pd.DataFrame, maps: np.ndarray | None, objects: np.ndarray | None, classes: list
) -> list[dict[str, Any]]:
    """The first ``MAX_FLAGS`` flags with their evidence galleries (cited samples, else the class's own)."""
    shown = []
    for f in flags[:MAX_FLAGS]:
        ev = f["evidence"]
        ids = evidence_ids(f)  # type: ignore[arg-type]
        if not ids and f.get("class") in classes:  # e.g. hotspots: the class's own images
            ids = rows[rows["label"] == f["class"]]["id"].head(GALLERY).tolist()
        tiles = [_tile(rows.loc[i], maps, objects, f.get("region")) for i in ids[:GALLERY] if i in rows.index]
        hidden = {"mean_map", *evidence_keys(f["kind"])}
        text = yaml.safe_dump({k: v for k, v in ev.items() if k not in hidden}, sort_keys=False, width=100)
        shown.append({**f, "tiles": tiles, "evidence_text": text})
    return shown


CROPS = 6  # region crops per finding
CROP = 72  # crop side in the report (pixels)


def _crops(region: list[float], rows: pd.DataFrame, classes: list[str]) -> list[dict[str, str]]:
    """The region (with a quarter of its size around it) cropped from up to ``CROPS`` of the classes' images."""
    out = []
    sub = rows[rows["label"].isin(classes)].sort_values("row").head(CROPS)
    for _, row in sub.iterrows():
        img = thumbnail(Path(row["path"]), 256)
        w, h = region[2] - region[0], region[3] - region[1]
        box = [region[0] - w / 4, region[1] - h / 4, region[2] + w / 4, region[3] + h / 4]
        x0, y0, x1, y1 = (round(min(max(v, 0.0), 1.0) * 256) for v in box)
        crop = img[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        big = np.asarray(Image.fromarray(crop).resize((CROP, CROP), Image.Resampling.NEAREST))
        out.append({"id": str(row["id"]), "src": data_uri(big, "PNG")})
    return out


def _findings(run: RunDir, rows: pd.DataFrame) -> list[dict[str, Any]]:
    """``flags.json`` findings with their intervention image pairs as data URIs (and region crops)."""
    findings = run.read_findings()
    path = run.findings_arrays_path
    arrays = np.load(path) if path.exists() else {}
    out = []
    for f in findings:
        examples = []
        for ex in f.get("examples", []):
            key = ex["key"].replace("/", "~")
            if key in arrays:
                pair = arrays[key]
                examples.append({**ex, "before": data_uri(pair[0], "PNG"), "after": data_uri(pair[1], "PNG")})
        crops = _crops(f["region"], rows, f["classes"]) if f.get("region") else []
        out.append({**f, "examples": examples, "crops": crops})
    return out


def _timing(key: str, value: Any) -> tuple[str, str]:
    """A timings entry with its unit (``total_s`` -> ``total``, ``12.3 s``)."""
    if key.startswith("images_per_s"):
        return key.replace("images_per_s", "images per second").replace("_", " "), f"{value:.1f} images/s"
    if key.startswith("images"):
        return key.replace("_", " "), f"{value} images"
    name = key.removesuffix("_s").replace("_", " ")
    return name, f"{value:.1f} s" if value >= 1 else f"{1000 * value:.0f} ms"


def _concepts(analyses: dict[str, Any], rows: pd.DataFrame, classes: list[str]) -> list[dict[str, Any]]:
    """Per class of ``classes`` (in that order) that has concepts: its DFF concepts (share of attention, where
    they lie, specificity) with prototype tiles."""
    out = []
    known = analyses.get("concepts") or {}
    for cls, info in ((c, known[c]) for c in classes if c in known):
        concepts = []
        for c in sorted(info["concepts"], key=lambda c: -(c["share"] or 0.0)):
            pid = c.get("prototype_id")
            src = None
            if pid in rows.index:
                img = thumbnail(Path(rows.loc[pid, "path"]), THUMB)
                src = data_uri(overlay(img, np.asarray(c["heat"], np.float32)), "JPEG")
            concepts.append({**c, "src": src})
        out.append({"class": cls, "method": info["method"], "n": info["n"], "concepts": concepts})
    return out


def _class_attribute(table: pd.DataFrame, groups: dict[str, Any], classes: list[str]) -> list[dict[str, Any]]:
    """Per metadata attribute: accuracy (and n) of every class x value cell."""
    first = one_row_per_sample(table)
    out = []
    for attr in groups:
        if attr not in first.columns:
            continue
        values = sorted(first[attr].astype(str).unique())[:12]
        rows = []
        for c in classes:
            sub = first[first["label"] == c]
            cells = []
            for v in values:
                cell = sub[sub[attr].astype(str) == v]
                cells.append({"n": len(cell), "accuracy": float(cell["correct"].mean()) if len(cell) else None})
            rows.append({"class": c, "cells": cells})
        out.append({"attribute": attr, "values": values, "rows": rows})
    return out


def build_context(root: Path) -> dict[str, Any]:
    """Everything the template shows, from the files of a finished run."""
    run = RunDir(root)
    summary, flags = load_run(root)
    table = run.read_table()
    analyses = summary.get("analyses") or {}
    target = analyses.get("target", "label")
    named = table["method"].dropna()
    primary = (analyses.get("methods") or [str(m) for m in named.iloc[:1]] or [""])[0]
    rows = table[(table["method"] == primary) & (table["target"] == target)].set_index("id", drop=False)
    maps, objects = run.load_maps(primary, target), run.load_objects()
    status, headline, deciding = _verdict(summary, flags)
    order = class_order(summary["dataset"]["classes"], flags)
    deep = _deep_dive(run, table, target, objects)
    sanity = summary.get("sanity") or {}
    return {
        "run": str(root.name),
        "status": status,
        "verdict": headline,
        "verdict_rules": deciding,
        "summary": summary,
        "flags": _flag_cards(flags, rows, maps, objects, summary["dataset"]["classes"]),
        "n_flags": len(flags),
        "by_severity": {s: sum(f["severity"] == s for f in flags) for s in ("high", "medium", "low")},
        "primary": primary,
        "target": target,
        "methods": sorted(summary["aggregates"]),
        "cards": class_cards(run, summary, rows, primary, target, order[:CARDS]),
        "class_rows": class_rows(summary, flags, primary) if len(order) > CARDS else [],
        "n_classes": len(order),
        "groups": [
            {"attribute": a, "values": [{"value": v, **g} for v, g in vals.items()]}
            for a, vals in (summary.get("groups") or {}).items()
        ],
        "mprt": (sanity.get("mprt") or {}).get("methods", {}),
        "blocks": (sanity.get("mprt") or {}).get("randomized_blocks", []),
        "config": yaml.safe_dump(summary.get("config", {}), sort_keys=False, width=100),
        "skipped": summary["dataset"].get("skipped", [])[:200],
        "n_skipped": len(summary["dataset"].get("skipped", [])),
        "skip_counts": summary["dataset"].get("skip_counts", {}),
        "warnings": summary["dataset"].get("warning_counts", {}),
        "timings": [_timing(k, v) for k, v in (summary.get("timings") or {}).items() if isinstance(v, int | float)],
        "findings": _findings(run, rows),
        "scale": colour_scale(),
        "class_attribute": _class_attribute(table, summary.get("groups") or {}, summary["dataset"]["classes"]),
        "localization": (summary.get("run") or {}).get("localization") or {},
        "skipped_methods": (summary.get("run") or {}).get("skipped_methods") or {},
        "skipped_analyses": analyses.get("skipped") or {},
        "triage": triage_rows(analyses.get("triage") or {}),
        "triage_counts": {a: len(r) for a, r in (analyses.get("triage") or {}).items()},
        "concepts": _concepts(analyses, rows, order[:CONCEPT_CLASSES]),
        "n_concept_classes": len(analyses.get("concepts") or {}),
        "versions": summary.get("versions", {}),
        "thumb": THUMB,
        "deep": deep,
        "agreement": (sanity.get("agreement") or {}).get("*", {}),
        "kinds": sorted({f["kind"] for f in flags}),
        "coverage": _coverage(run, table, deep),
    }


def _coverage(run: RunDir, table: pd.DataFrame, deep: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which samples got which methods and metrics (``expensive.json``; None for runs that predate it)."""
    if not run.has(EXPENSIVE):
        return None
    info = run.read_json(EXPENSIVE)
    n = int(table["row"].nunique())
    per_method = table.groupby("method", sort=False)["row"].nunique().to_dict()
    metric_cols = [c for c in info["metrics"] if c in table.columns]
    rows = [
        {"name": m, "what": "method", "n": int(per_method.get(m, 0)), "subset": m in info["methods"]}
        for m in dict.fromkeys(table["method"].dropna())
    ]
    rows += [
        {"name": c, "what": "metric", "n": int(table.loc[table[c].notna(), "row"].nunique()), "subset": True}
        for c in metric_cols
    ]
    if deep:
        rows.append(
            {"name": "occlusion, guided backprop, feature maps", "what": "deep dive", "n": len(deep), "subset": True}
        )
    return {
        "mode": info["subset"],
        "per_class": info["per_class"],
        "n": n,
        "rows": rows,
        "samples": info["samples"][:MAX_COVERAGE_IDS],
        "n_samples": info["n"],
    }


def render_report(run: Path, out: Path | None = None) -> Path:
    """Render ``report.html`` (default: inside the run directory) from saved results; returns its path."""
    out = out or run / REPORT
    html = environment().get_template("report.html.j2").render(**build_context(run))
    atomic_write_bytes(out, html.encode("utf-8"))
    return out

"""``report.html``: one self-contained page rendered only from a run's saved results (``auditor report RUN``).

Python prepares numbers and inline images; the jinja2 template (autoescape on, StrictUndefined) draws every
chart as inline SVG. Nothing is fetched: no CDN, no ``fetch()``, images are data URIs, galleries are capped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from auditor.compare import environment
from auditor.gate import load_run
from auditor.render import data_uri, grey, overlay, thumbnail
from auditor.store import atomic_write_bytes

GALLERY = 6  # images per flag
THUMB = 112
MAX_FLAGS = 20
MAX_COVERAGE_IDS = 300  # expensive-subset ids listed in the report (all are in expensive.json)
_EVIDENCE_IDS = ("worst_ids", "error_ids", "ids", "prototype_ids")


def _verdict(flags: list[dict[str, Any]]) -> tuple[str, str]:
    severities = {f["severity"] for f in flags if f["kind"] != "unreliable_method"}
    if "high" in severities:
        return "fail", "Shortcut evidence found"
    if "medium" in severities:
        return "warn", "Possible shortcuts: review the findings"
    return "pass", "No shortcut found"


def _outline(objects: np.ndarray | None, row: int, size: int) -> np.ndarray | None:
    """``[size, size]`` bool outline of the object from the stored 32 x 32 object grid, or None."""
    if objects is None or not np.isfinite(objects[row]).all():
        return None
    g = torch.from_numpy(np.asarray(objects[row], np.float32))[None, None]
    inside = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0.5
    eroded = -F.max_pool2d(-inside.float()[None, None], 3, 1, 1)[0, 0] > 0.5
    return (inside & ~eroded).numpy()


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


def _deep_dive(run: Path, table: pd.DataFrame, target: str, objects: np.ndarray | None) -> list[dict[str, Any]]:
    """Per flagged sample: every method's map, guided backprop, occlusion and the top feature maps."""
    meta_path, arr_path = run / "deepdive.json", run / "maps" / "deepdive.npz"
    if not meta_path.exists() or not arr_path.exists():
        return []
    meta = json.loads(meta_path.read_text())
    arrays = np.load(arr_path)
    first = table.drop_duplicates("id").set_index("id")
    methods = sorted(str(m) for m in table["method"].unique())
    out = []
    for i, (sid, row) in enumerate(zip(meta["ids"], meta["rows"], strict=True)):
        info = first.loc[sid]
        img = thumbnail(Path(info["path"]), THUMB)
        views: list[dict[str, str]] = [{"name": "image", "src": data_uri(img, "JPEG")}]
        mask = _mask_image(objects, row, THUMB)
        if mask is not None:
            views.append({"name": "object mask", "src": data_uri(mask, "PNG")})
        for m in methods:
            path = run / "maps" / f"{m}__{target}.npy"
            if path.exists():
                low = np.load(path, mmap_mode="r")[row]
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


def _curve_points(curve: np.ndarray, width: int = 220, height: int = 90) -> str:
    xs = np.linspace(0, width, len(curve))
    ys = height - np.clip(curve, 0, 1) * height
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))


def _heat(diff: list[list[float]]) -> list[dict[str, Any]]:
    d = np.asarray(diff)
    peak = float(np.abs(d).max()) or 1.0
    cells = []
    for y in range(d.shape[0]):
        for x in range(d.shape[1]):
            v = d[y, x] / peak
            if abs(v) < 0.05:
                continue
            cells.append({"x": x, "y": y, "fill": "#c0392b" if v > 0 else "#2e6db4", "op": round(min(1, abs(v)), 2)})
    return cells


def build_context(run: Path) -> dict[str, Any]:
    """Everything the template shows, from the files of a finished run."""
    summary, flags = load_run(run)
    table = pd.read_parquet(run / "samples.parquet")
    analyses = summary.get("analyses") or {}
    target = analyses.get("target", "label")
    methods = analyses.get("methods") or [str(table["method"].iloc[0])]
    primary = methods[0]
    rows = table[(table["method"] == primary) & (table["target"] == target)].set_index("id", drop=False)
    map_path = run / "maps" / f"{primary}__{target}.npy"
    maps = np.load(map_path, mmap_mode="r") if map_path.exists() else None
    obj_path = run / "maps" / "_object.npy"
    objects = np.load(obj_path, mmap_mode="r") if obj_path.exists() else None
    classes = summary["dataset"]["classes"]
    status, verdict = _verdict(flags)

    shown = []
    for f in flags[:MAX_FLAGS]:
        ev = f["evidence"]
        ids: list[str] = next((ev[k] for k in _EVIDENCE_IDS if isinstance(ev.get(k), list) and ev[k]), [])
        if not ids and f.get("class") in classes:  # e.g. hotspots: the class's own images
            ids = rows[rows["label"] == f["class"]]["id"].head(GALLERY).tolist()
        tiles = [_tile(rows.loc[i], maps, objects, f.get("region")) for i in ids[:GALLERY] if i in rows.index]
        shown.append(
            {
                **f,
                "tiles": tiles,
                "evidence_text": yaml.safe_dump(
                    {k: v for k, v in ev.items() if k not in _EVIDENCE_IDS and k != "mean_map"},
                    sort_keys=False,
                    width=100,
                ),
            }
        )

    cards = []
    agg = summary["aggregates"].get(primary, {}).get(target, {})
    for cls in classes:
        acc = summary["accuracy"].get(cls, {})
        stats = agg.get(cls, {})
        bars = []
        for metric in ("energy_in_mask", "pointing_game", "relevance_rank_accuracy", "insertion_auc", "deletion_auc"):
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
        curves = []
        for kind in ("deletion", "insertion"):
            path = run / "curves" / f"{kind}_curve__{primary}__{target}.npy"
            if path.exists():
                arr = np.load(path, mmap_mode="r")[rows[rows["label"] == cls]["row"].to_numpy()]
                arr = np.asarray(arr, np.float64)
                arr = arr[np.isfinite(arr).all(1)]
                if len(arr):
                    curves.append({"kind": kind, "points": _curve_points(arr.mean(0)), "n": len(arr)})
        hot = (analyses.get("hotspots") or {}).get(primary, {}).get(cls)
        cards.append(
            {
                "cls": cls,
                "accuracy": acc.get("accuracy"),
                "n": acc.get("n", 0),
                "bars": bars,
                "curves": curves,
                "heat": _heat(hot["diff"]) if hot else [],
                "hot": {k: hot[k] for k in ("location", "lift", "persistence")} if hot else None,
            }
        )

    deep = _deep_dive(run, table, target, objects)
    groups = [
        {"attribute": a, "values": [{"value": v, **g} for v, g in vals.items()]}
        for a, vals in (summary.get("groups") or {}).items()
    ]
    sanity = summary.get("sanity") or {}
    mprt = (sanity.get("mprt") or {}).get("methods", {})
    config = yaml.safe_dump(summary.get("config", {}), sort_keys=False, width=100)
    return {
        "run": str(run.name),
        "status": status,
        "verdict": verdict,
        "summary": summary,
        "flags": shown,
        "n_flags": len(flags),
        "by_severity": {s: sum(f["severity"] == s for f in flags) for s in ("high", "medium", "low")},
        "primary": primary,
        "target": target,
        "methods": sorted(summary["aggregates"]),
        "cards": cards,
        "groups": groups,
        "mprt": mprt,
        "blocks": (sanity.get("mprt") or {}).get("randomized_blocks", []),
        "config": config,
        "skipped": summary["dataset"].get("skipped", [])[:200],
        "warnings": summary["dataset"].get("warning_counts", {}),
        "timings": summary.get("timings", {}),
        "versions": summary.get("versions", {}),
        "thumb": THUMB,
        "deep": deep,
        "agreement": (sanity.get("agreement") or {}).get("*", {}),
        "kinds": sorted({f["kind"] for f in flags}),
        "coverage": _coverage(run, table, deep),
    }


def _coverage(run: Path, table: pd.DataFrame, deep: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which samples got which methods and metrics (``expensive.json``; None for runs that predate it)."""
    path = run / "expensive.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    n = int(table["row"].nunique())
    per_method = table.groupby("method", sort=False)["row"].nunique().to_dict()
    metric_cols = [c for c in info["metrics"] if c in table.columns]
    rows = [
        {"name": m, "what": "method", "n": int(per_method.get(m, 0)), "subset": m in info["methods"]}
        for m in dict.fromkeys(table["method"])
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
    out = out or run / "report.html"
    html = environment().get_template("report.html.j2").render(**build_context(run))
    atomic_write_bytes(out, html.encode("utf-8"))
    return out

"""``auditor compare RUN_A RUN_B --out diff.html``: two models on the same data, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditor.errors import ConfigError
from auditor.outputs.gate import check_compatible, load_run
from auditor.outputs.render import data_uri, environment, overlay, thumbnail
from auditor.shortcuts.grids import grid_maps
from auditor.stats import describe, spearman_rows
from auditor.store.rundir import RunDir, atomic_write_bytes

SHOWN_CLASSES = 40  # with more classes, the HTML lists the per-class deltas that changed (diff.json: every one)


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def metric_deltas(
    a: pd.DataFrame, b: pd.DataFrame, classes: list[str], columns: dict[str, dict[str, Any]], seed: int = 0
) -> list[dict[str, Any]]:
    """Paired per-sample deltas (b − a) per method, target, class and metric.

    ``columns`` is ``summary.metric_columns`` (``{column: {metric, direction}}``, from the metric registry):
    a delta is called worse or better only for a column with a direction.
    """
    blocks = []
    keys = ["id", "method", "target"]
    merged = a.merge(b, on=keys, suffixes=("_a", "_b"))
    metrics = [c for c in a.columns if c in b.columns and c in columns]
    for (method, target), grp in merged.groupby(["method", "target"], sort=False):
        rows = []
        by_class = dict(iter(grp.groupby("label_a", sort=False)))  # one pass, not a filter per class
        for cls in ["*", *classes]:
            sub = grp if cls == "*" else by_class.get(cls, grp.iloc[:0])
            for m in metrics:
                va, vb = sub[f"{m}_a"].to_numpy(np.float64), sub[f"{m}_b"].to_numpy(np.float64)
                ok = np.isfinite(va) & np.isfinite(vb)
                if ok.sum() < 2:
                    continue
                d = describe(vb[ok] - va[ok], seed=seed)
                direction = columns[m].get("direction")
                worse = (d["ci_high"] < 0) if direction == "higher" else (d["ci_low"] > 0) if direction else False
                better = (d["ci_low"] > 0) if direction == "higher" else (d["ci_high"] < 0) if direction else False
                rows.append(
                    {
                        "cls": cls,
                        "metric": m,
                        "a": _fmt(float(va[ok].mean())),
                        "b": _fmt(float(vb[ok].mean())),
                        "delta": _fmt(d["mean"]),
                        "ci": f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
                        "n": d["n"],
                        "tone": "worse" if worse else "better" if better else "",
                        "value": d["mean"],
                        "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"],
                    }
                )
        blocks.append({"method": str(method), "target": str(target), "rows": rows})
    return blocks


def shown_rows(rows: list[dict[str, Any]], n_classes: int) -> tuple[list[dict[str, Any]], int]:
    """The rows of one method's delta table that the HTML lists, and how many it leaves to ``diff.json``.

    Up to ``SHOWN_CLASSES`` classes, every row. Beyond, the all-classes rows (``*``) and the per-class rows whose
    interval excludes 0 in a direction (worse first): 1,000 classes x every metric was tens of thousands of rows.
    """
    if n_classes <= SHOWN_CLASSES:
        return rows, 0
    changed = sorted((r for r in rows if r["cls"] != "*" and r["tone"]), key=lambda r: r["tone"] != "worse")
    shown = [r for r in rows if r["cls"] == "*"] + changed
    return shown, len(rows) - len(shown)


def flag_changes(flags_a: list[dict[str, Any]], flags_b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flags that appeared, disappeared or changed severity (matched by ``id``)."""
    ia, ib = {f["id"]: f for f in flags_a}, {f["id"]: f for f in flags_b}
    out = [{**ib[k], "change": "appeared"} for k in ib if k not in ia]
    out += [{**ia[k], "change": "disappeared"} for k in ia if k not in ib]
    out += [
        {**ib[k], "change": f"{ia[k]['severity']} → {ib[k]['severity']}"}
        for k in ib
        if k in ia and ia[k]["severity"] != ib[k]["severity"]
    ]
    return out


def changed_explanations(
    run_a: Path, run_b: Path, a: pd.DataFrame, b: pd.DataFrame, top: int = 8
) -> tuple[str, list[dict[str, Any]]]:
    """The samples whose maps differ most between the runs (first common method, label target)."""
    dir_a, dir_b = RunDir(run_a), RunDir(run_b)
    common = [
        m
        for m in a["method"].dropna().unique()
        if m in set(b["method"]) and dir_a.has_maps(m, "label") and dir_b.has_maps(m, "label")
    ]
    if not common:
        return "", []
    method = str(common[0])
    ra = a[(a["method"] == method) & (a["target"] == "label")].set_index("id")
    rb = b[(b["method"] == method) & (b["target"] == "label")].set_index("id")
    ids = [i for i in ra.index if i in rb.index]
    maps_a, maps_b = dir_a.load_maps(method, "label"), dir_b.load_maps(method, "label")
    assert maps_a is not None and maps_b is not None  # checked above
    ga = grid_maps(maps_a[ra.loc[ids, "row"].to_numpy()])
    gb = grid_maps(maps_b[rb.loc[ids, "row"].to_numpy()])
    rho = spearman_rows(np.nan_to_num(ga.reshape(len(ids), -1)), np.nan_to_num(gb.reshape(len(ids), -1)))
    order = np.argsort(np.where(np.isfinite(rho), rho, 2.0))[:top]
    out = []
    for k in order:
        sid = ids[k]
        img = thumbnail(Path(ra.loc[sid, "path"]))
        out.append(
            {
                "id": sid,
                "label": ra.loc[sid, "label"],
                "rho": _fmt(float(rho[k])),
                "pred_a": ra.loc[sid, "pred"],
                "pred_b": rb.loc[sid, "pred"],
                "a": data_uri(overlay(img, maps_a[int(ra.loc[sid, "row"])])),
                "b": data_uri(overlay(img, maps_b[int(rb.loc[sid, "row"])])),
            }
        )
    return method, out


def compare_runs(run_a: Path, run_b: Path, out: Path) -> dict[str, Any]:
    """Write ``out`` (one self-contained HTML file) and return the comparison as data."""
    summary_a, flags_a = load_run(run_a)
    summary_b, flags_b = load_run(run_b)
    check_compatible(summary_b, summary_a)
    if summary_a["dataset"]["classes"] != summary_b["dataset"]["classes"]:
        raise ConfigError("the runs use different class lists")
    a, b = RunDir(run_a).read_table(), RunDir(run_b).read_table()
    classes = summary_a["dataset"]["classes"]
    columns = summary_a.get("metric_columns")
    if columns is None:
        raise ConfigError(f"{run_a} was written by an auditor without summary.metric_columns; re-run it to compare")
    deltas = metric_deltas(a, b, classes, columns)
    changes = flag_changes(flags_a, flags_b)
    method, changed = changed_explanations(run_a, run_b, a, b)
    html = (
        environment()
        .get_template("compare.html.j2")
        .render(
            name_a=run_a.name,
            name_b=run_b.name,
            dataset_id=summary_a["dataset"]["id"],
            n=summary_a["dataset"]["n"],
            flag_changes=changes,
            deltas=[
                {**b, "rows": rows, "hidden": hidden}
                for b in deltas
                for rows, hidden in [shown_rows(b["rows"], len(classes))]
            ],
            changed=changed,
            changed_method=method or "no common method",
        )
    )
    atomic_write_bytes(out, html.encode("utf-8"))
    data = {
        "deltas": deltas,
        "flag_changes": changes,
        "changed": [{k: v for k, v in s.items() if k not in ("a", "b")} for s in changed],
    }
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(data, indent=2, default=str).encode())
    return data

"""``expensive.subset``: which samples get the expensive methods and metrics, and the flagged second pass.

With ``flagged``, the cheap pass's analyses (no interventions, no reliability downgrade: a superset of
the final flags) name the samples behind each flag; :func:`flagged_spec` returns the map stage's spec for
a second pass over them, which replaces their rows. The choice is saved in ``expensive.json`` first, so
a resumed run re-runs the same samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from auditor.cams import CAMS
from auditor.metrics import METRICS
from auditor.run.mapstage import MapSpec
from auditor.shortcuts.catalog import evidence_ids
from auditor.shortcuts.flags import Flag
from auditor.store.rundir import EXPENSIVE, RunDir, one_row_per_sample


def initial_subset(mode: str, stratified: np.ndarray) -> np.ndarray:
    """``[n]`` bool: the expensive samples of the main pass (``flagged`` chooses after it)."""
    if mode == "all":
        return np.ones(len(stratified), dtype=bool)
    if mode == "stratified":
        return stratified.copy()
    return np.zeros(len(stratified), dtype=bool)


def select_flagged(
    flags: list[Flag], table: pd.DataFrame, stratified: np.ndarray, per_flag: int, total: int | None = None
) -> dict[int, list[str]]:
    """The samples behind each flag: ``{row: [flag ids]}``.

    Per flag, the sample ids its evidence cites (its analysis's evidence id keys) come first; a flag about
    a class is then filled with that class's stratified samples; at most ``per_flag`` samples per flag, and
    at most ``total`` samples in all (the flags come most severe first, so they are served first).

    Args:
        flags: flags of the cheap pass (``flags.json`` entries).
        table: the cheap pass's ``samples.parquet`` (columns ``id``, ``row``, ``label``).
        stratified: ``[n]`` bool, the run's stratified subset.
        per_flag: ``expensive.per_class``.
        total: ``expensive.total`` (None: no cap).
    """
    first = one_row_per_sample(table)
    row_of = dict(zip(first["id"], first["row"].astype(int), strict=True))
    chosen: dict[int, list[str]] = {}
    for flag in flags:
        rows = [row_of[v] for v in evidence_ids(flag) if v in row_of]
        if flag.get("class") is not None:
            own = first[first["label"] == flag["class"]]["row"].astype(int).to_numpy()
            rows += own[stratified[own]].tolist()
        for r in list(dict.fromkeys(rows))[:per_flag]:
            if r in chosen or total is None or len(chosen) < total:
                chosen.setdefault(r, []).append(flag["id"])
    return dict(sorted(chosen.items()))


def flagged_spec(spec: MapSpec, chosen: dict[int, list[str]]) -> MapSpec:
    """The second pass's spec: the chosen samples become expensive; no counterfactual forwards (the main
    pass's stay)."""
    expensive = spec.expensive.copy()
    expensive[list(chosen)] = True
    return dataclasses.replace(spec, expensive=expensive, probe=np.zeros_like(spec.probe))


def saved_choice(rundir: RunDir) -> dict[int, list[str]] | None:
    """The flagged choice of an interrupted run, or None."""
    if not rundir.has(EXPENSIVE):
        return None
    return {int(r): f for r, f in rundir.read_json(EXPENSIVE)["reasons"].items()}


def write_choice(rundir: RunDir, chosen: dict[int, list[str]]) -> None:
    rundir.write_json(EXPENSIVE, {"subset": "flagged", "reasons": {str(r): f for r, f in chosen.items()}})


def write_expensive(
    rundir: RunDir, spec: MapSpec, table: pd.DataFrame, mode: str, per_class: int, total: int | None = None
) -> None:
    """``expensive.json``: which samples got the expensive methods and metrics, and why (for the report)."""
    reasons: dict[str, Any] = rundir.read_json(EXPENSIVE)["reasons"] if rundir.has(EXPENSIVE) else {}
    first = one_row_per_sample(table)
    rows = first[spec.expensive[first["row"].astype(int).to_numpy()]]
    rundir.write_json(
        EXPENSIVE,
        {
            "subset": mode,
            "per_class": per_class,
            "total": total,
            "methods": [m for m in spec.methods if CAMS[m].expensive],
            "metrics": [m for m in spec.metrics if METRICS[m].expensive],
            "faithfulness_methods": list(spec.faithful),
            "n": len(rows),
            "samples": [
                {"id": i, "label": lab, "flags": reasons.get(str(int(r)), [])}
                for i, lab, r in zip(rows["id"], rows["label"], rows["row"], strict=True)
            ],
            "reasons": reasons,
        },
    )

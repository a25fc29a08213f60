"""``spatial_hotspot``: a compact region where one class's maps are hot and the other classes' are not.

The measurement finds each class's region on the 32 x 32 grid. Regions that pass the measurement
criteria (lift, concentration, area, persistence, FDR, off the object) are *candidates*; with a model,
each candidate is tested by intervention (remove the region from the class's images, paste it into
others'). The flag function then judges: high severity needs a confirming intervention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage, stats

from auditor.shortcuts.examples import finding_region_examples
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, change, make_flag, pct
from auditor.shortcuts.grids import (
    GRID,
    Indexable,
    RowsOf,
    by_chunk,
    control_box,
    describe_location,
    finite_rows,
    object_overlap,
    sum_rows,
)
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.thresholds import SharedParams, params_of
from auditor.stats import bh_adjust


class Params(SharedParams):
    """``spatial_hotspot``'s thresholds (config ``thresholds``, flat keys)."""

    hotspot_lift: float = Field(2.0, gt=1, description="class mass in the region / other classes' mass there")
    hotspot_concentration: float = Field(
        2.0, gt=1, description="class mass in the region / the region's share of the image (uniform map: 1)"
    )
    hotspot_max_area: float = Field(0.15, gt=0, le=1, description="largest region (share of the image)")
    hotspot_persistence: float = Field(0.5, gt=0, le=1, description="share of the class's maps hot in the region")


def _region(diff: np.ndarray, level: float) -> np.ndarray:
    """The 4-connected cells with ``diff >= level * max`` around the peak (``[32, 32]`` bool)."""
    peak = np.unravel_index(np.nanargmax(diff), diff.shape)
    labels, _ = ndimage.label(diff >= level * diff[peak])
    return np.asarray(labels == labels[peak])


def region_mass(maps: Indexable, region: np.ndarray) -> np.ndarray:
    """``[n]`` each map's mass in the ``[32, 32]`` bool ``region``, a chunk of maps read at a time."""

    def mass(chunk: np.ndarray) -> np.ndarray:
        return np.asarray(chunk[:, region].sum(1))

    return by_chunk(maps, mass)


def class_hotspots(
    maps: Indexable,
    labels: np.ndarray,
    classes: Sequence[str],
    objects: Indexable | None = None,
    level: float = 0.5,
) -> dict[str, Any]:
    """Per class: where its mean L1-normalized map exceeds the other classes' mean, on a 32 x 32 grid.

    Args:
        maps: ``[n, 32, 32]`` L1-normalized maps (:func:`~auditor.shortcuts.grids.grid_maps`; NaN rows ignored).
        labels: ``[n]`` class names.
        classes: class names.
        objects: ``[n, 32, 32]`` object fraction per cell (NaN rows = no mask), or None.
        level: the region is the connected set of cells within ``level`` of the peak difference.

    Returns:
        ``{class: {region [x0, y0, x1, y1] in [0, 1], area (of the box), location, lift, concentration,
        persistence, p_value, object_overlap, class_mass, other_mass, diff, diff_scale}}``; ``lift`` = the class's mean
        mass in the region over the other classes'; ``persistence`` = share of the class's maps with more
        than twice the other classes' mean mass there; ``concentration`` = the class's mean mass in the
        region over the region's share of the grid (1 = a uniform map); ``p_value`` = one-sided
        Mann-Whitney U (class > others); ``diff`` = the ``[32, 32]`` mean difference in integer percent of its
        largest absolute value (``diff_scale`` = that value / 100: ``diff * diff_scale`` is the difference; at
        7 decimals the grids were half of a 100-class ``summary.json``).
    """
    out: dict[str, Any] = {}
    ok = finite_rows(maps)
    total = sum_rows(maps, np.flatnonzero(ok))  # the other classes' mean is the total less the class's own: a
    # class's pass reads its own maps, not every map (1,000 classes x 5,000 maps took 92 s at five methods)
    for cls in classes:
        own, rest = ok & (labels == cls), ok & (labels != cls)
        n_own, n_rest = int(own.sum()), int(rest.sum())
        if n_own < 3 or n_rest < 3:
            continue
        own_sum = sum_rows(maps, np.flatnonzero(own))
        diff = own_sum / n_own - (total - own_sum) / n_rest
        if not np.isfinite(diff).any() or np.nanmax(diff) <= 0:
            continue
        region = _region(diff, level)
        ys, xs = np.nonzero(region)
        box = [xs.min() / GRID, ys.min() / GRID, (xs.max() + 1) / GRID, (ys.max() + 1) / GRID]
        mass = region_mass(maps, region)
        m_own, m_rest = mass[own], mass[rest]
        base = float(m_rest.mean())
        out[cls] = {
            "region": [float(v) for v in box],
            "area": float((box[2] - box[0]) * (box[3] - box[1])),  # of the bounding box: artefacts are compact
            "location": describe_location(box),
            "lift": float(m_own.mean() / max(base, 1e-12)),
            "concentration": float(m_own.mean() / region.mean()),
            "persistence": float((m_own > 2 * base).mean()),
            "p_value": float(stats.mannwhitneyu(m_own, m_rest, alternative="greater").pvalue),
            "object_overlap": object_overlap(objects, own, region),
            "class_mass": float(m_own.mean()),
            "other_mass": base,
            **_quantized(np.asarray(diff)),
        }
    return out


def _quantized(diff: np.ndarray) -> dict[str, Any]:
    """``{diff, diff_scale}``: ``diff`` in integer percent of its largest absolute value (NaN: 0)."""
    scale = float(np.nanmax(np.abs(diff))) / 100 or 1.0
    return {"diff": np.round(np.nan_to_num(diff) / scale).astype(int).tolist(), "diff_scale": scale}


def measure(inputs: AnalysisInputs) -> Measurement:
    hotspots = {}
    for m, (sub, grids) in inputs.grids.items():
        rows = sub["row"].to_numpy()
        obj = RowsOf(inputs.objects, rows) if inputs.objects is not None else None
        found = class_hotspots(grids, sub["label"].to_numpy(), inputs.classes, obj)
        if m != inputs.methods[0]:  # the report draws the first method's grids: the others' were 4/5 of the file
            found = {c: {k: v for k, v in r.items() if k not in ("diff", "diff_scale")} for c, r in found.items()}
        hotspots[m] = found
    return {"hotspots": hotspots, "interventions": {}}


def map_tests(per_method: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"map/<method>/<class>": Mann-Whitney p}``: the maps' test of each class's region."""
    return {f"map/{m}/{c}": r["p_value"] for m, per_class in per_method.items() for c, r in per_class.items()}


def tests(measured: Measurement) -> dict[str, float]:
    """Every test that can raise a ``spatial_hotspot``: the maps' test per method and class, and the paired
    removal and transplant tests (region minus control box) per class intervened on."""
    out = map_tests(measured["hotspots"])
    for c, iv in measured.get("interventions", {}).items():
        out |= {f"removal/{c}": iv["removal_p"], f"paste/{c}": iv["paste_p"]}
    return out


def candidates(
    per_method: dict[str, dict[str, Any]], t: Params, q: dict[str, float] | None = None
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per class, the methods whose region passes every measurement criterion (a measurement, no verdict).

    Args:
        q: q-values of :func:`map_tests` (the run's family); None: adjusted within the maps' tests, the
            screening that picks where to intervene before the run's family exists.
    """
    p = map_tests(per_method)
    q = q if q is not None else dict(zip(p, bh_adjust(list(p.values())), strict=True))
    hits: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for m, per_class in per_method.items():
        for c, r in per_class.items():
            on_object = np.isfinite(r["object_overlap"]) and r["object_overlap"] > t.hotspot_object_overlap
            if (
                r["lift"] >= t.hotspot_lift
                and r["area"] <= t.hotspot_max_area
                and r["concentration"] >= t.hotspot_concentration
                and r["persistence"] >= t.hotspot_persistence
                and q[f"map/{m}/{c}"] < t.alpha
                and not on_object
            ):
                hits.setdefault(c, []).append((m, r))
    return hits


def _strongest(support: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return max(support, key=lambda mr: mr[1]["lift"])[1]


def _hotspot_classes(measured: Measurement, inputs: AnalysisInputs) -> list[str]:
    return list(candidates(measured["hotspots"], params_of(inputs.thresholds, Params)))


def _hotspot_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: remove / paste its candidate region and the control box on keyed draws of the
    class's and other classes' images."""
    assert inputs.intervener is not None
    iv, first, n = inputs.intervener, inputs.first, inputs.thresholds.intervention_images
    hits = candidates(measured["hotspots"], params_of(inputs.thresholds, Params))[cls]
    region = _strongest(hits)["region"]  # exact grid box (the flag's copy is rounded for display)
    own = np.sort(keyed_rows(first[first["label"] == cls], n, inputs.seed, "hotspot-test"))
    other = np.sort(keyed_rows(first[first["label"] != cls], n, inputs.seed, "hotspot-test"))
    ctrl = control_box(region)
    result = iv.region_test(own.tolist(), other.tolist(), inputs.classes.index(cls), region, ctrl, inputs.seed)
    return {"region": region, **result}


WORK = PerClass(
    classes=_hotspot_classes,
    run=_hotspot_class,
    gather=lambda measured, results: {"interventions": results},
    what="hotspot confirmation, classes",
)


def _confirmed(c: str, test: dict[str, Any] | None, t: Params, q: dict[str, float]) -> tuple[bool, bool]:
    """(removal confirmed, transplant confirmed): each effect over the control box at least
    ``intervention_effect`` and significant (the run's q-value)."""
    if not test:
        return False, False
    removal = test["removal_effect"] >= t.intervention_effect and q[f"removal/{c}"] < t.alpha
    paste = test["paste_effect"] >= t.intervention_effect and q[f"paste/{c}"] < t.alpha
    return bool(removal), bool(paste)


def _message(c: str, r0: dict[str, Any], test: dict[str, Any] | None, confirmed: bool) -> str:
    msg = (
        f"The {c} class's maps concentrate on {r0['location']} ({pct(r0['persistence'])} of its images, "
        f"{r0['lift']:.1f}x the other classes' attention there)"
    )
    if test:
        drop, gain = -test["removal_drop"], test["paste_gain"]
        ctrl = test["control"]
        msg += (
            f"; removing that region {change(drop, f'p({c})')} and pasting it into other images "
            f"{change(gain, 'it')} (the same for a control box of the same size: {change(-ctrl['removal_drop'], 'it')} "
            f"and {change(ctrl['paste_gain'], 'it')})" + ("" if confirmed else "; the transplant does not confirm it")
        )
    return msg + "."


def hotspot_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``spatial_hotspot`` per class; high severity requires a confirming intervention (removal and transplant);
    a region whose removal does not lower p(class) is not flagged (the intervention measured no effect)."""
    t, interventions = params_of(ctx.thresholds, Params), measured.get("interventions", {})
    q = ctx.q_values("hotspots", tests(measured))
    flags = []
    for c, support in candidates(measured["hotspots"], t, q).items():
        r0 = _strongest(support)
        test = interventions.get(c)
        removal, paste = _confirmed(c, test, t, q)
        confirmed = removal and paste
        if test is not None and not removal:
            continue  # the model does not need the region: where the maps look is not what it uses
        if test is not None:
            sev = "high" if paste else "medium"
        else:
            sev = "medium" if r0["lift"] >= 2 * t.hotspot_lift else "low"
        evidence = {k: r0[k] for k in ("lift", "concentration", "persistence", "area", "p_value", "object_overlap")}
        evidence["intervention"] = test
        evidence["confirmed"] = confirmed
        evidence["q_value"] = min(q[f"map/{m}/{c}"] for m, _ in support)
        score = min(1.0, r0["persistence"] * (1 - 1 / r0["lift"]))
        methods = [m for m, _ in support]
        msg = _message(c, r0, test, confirmed)
        flags.append(make_flag("spatial_hotspot", c, None, sev, score, msg, evidence, methods, r0["region"]))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        examples=finding_region_examples,
        name="hotspots",
        params=Params,
        kinds={"spatial_hotspot": Cause("region", leads=True)},
        needs=frozenset({"maps"}),  # the intervention runs where the model is; without it: at most medium
        measure=measure,
        flag=hotspot_flags,
        evidence_ids=(),
        per_class=WORK,
        tests=tests,
    )
)

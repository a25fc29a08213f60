"""Every analysis, and what runs them: importing this module registers them all (the order of
:data:`MODULES` is the order their flags are built).

The analyses import :mod:`auditor.shortcuts.registry` (the types) and nothing above it; this catalog sits
above them, so no import runs in a loop. Readers of flags (the report, the flagged pass, the deep dive)
and the run stage import from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict

from auditor.shortcuts import (
    attributes,
    backdrop,
    background,
    clusters,
    concepts,
    counterfactual,
    cues,
    frame,
    hotspots,
    properties,
    reliability,
    subsets,
)
from auditor.shortcuts.findings import Cause, Finding, group_findings
from auditor.shortcuts.flags import Flag, downgrade_unreliable, order_flags
from auditor.shortcuts.registry import (
    ANALYSES,
    Analysis,
    AnalysisInputs,
    Executor,
    FlagContext,
    Measurement,
    execute_here,
    log,
    unreliable_methods,
)
from auditor.shortcuts.thresholds import SharedParams
from auditor.stats import bh_adjust

MODULES = (
    background,
    hotspots,
    cues,
    subsets,
    frame,
    backdrop,
    properties,
    attributes,
    counterfactual,
    clusters,
    concepts,
    reliability,
)


class Thresholds(  # fields in reverse base order: shared, background, hotspots, ..., concepts
    concepts.Params,
    clusters.Params,
    counterfactual.Params,
    attributes.Params,
    properties.Params,
    backdrop.Params,
    frame.Params,
    subsets.Params,
    cues.Params,
    hotspots.Params,
    background.Params,
):
    """Flag thresholds (config key ``thresholds``): every analysis's ``Params`` and the shared ones, flat.
    Heuristics, documented in the README (the table is generated from these models)."""

    model_config = ConfigDict(extra="forbid")


def registered() -> list[Analysis]:
    """Every registered analysis, in registration order (this module's imports registered them)."""
    return ANALYSES.values()


def thresholds_table() -> str:
    """The README's thresholds table (markdown), generated from every analysis's ``Params``: key, default,
    who reads it, meaning. ``tests/test_readme_tables.py`` fails when the README's copy is stale."""
    rows = ["| key | default | read by | meaning |", "|---|---|---|---|"]
    owner = {f: "shared" for f in SharedParams.model_fields}
    for a in registered():
        for f in a.params.model_fields:
            owner.setdefault(f, ", ".join(f"`{k}`" for k in a.kinds))
    for name, info in Thresholds.model_fields.items():
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {info.default} | {owner[name]} | {text} |")
    return "\n".join(rows) + "\n"


def causes() -> dict[str, Cause]:
    """Flag kind -> the cause its analysis declares."""
    return {k: c for a in registered() for k, c in a.kinds.items()}


def group_by_cause(flags: list[Flag]) -> list[Finding]:
    """The run's flags grouped by the causes the analyses declare (``findings.group_findings``)."""
    return group_findings(flags, causes())


def evidence_keys(kind: str) -> tuple[str, ...]:
    """The evidence keys holding sample ids in flags of ``kind`` (none for an unknown kind)."""
    return next((a.evidence_ids for a in registered() if kind in a.kinds), ())


def evidence_ids(flag: Flag) -> list[str]:
    """The sample ids a flag's evidence cites, in the order its analysis declares its id keys."""
    out: list[str] = []
    for key in evidence_keys(flag["kind"]):
        out += [v for v in flag["evidence"].get(key) or [] if isinstance(v, str)]
    return list(dict.fromkeys(out))


def unmet(inputs: AnalysisInputs, needs: set[str], interventions: bool = True) -> dict[str, str]:
    """``{need: why the run lacks it}`` for each of ``needs`` (from :data:`~auditor.shortcuts.registry.NEEDS`)
    the run does not meet; each is checked only when asked (reading maps or masks costs)."""

    def has_cf() -> bool:
        first = inputs.first
        return "cf_bg_pred" in first.columns and bool((first["cf_bg_pred"].fillna("") != "").any())

    checks = {
        "maps": (lambda: bool(inputs.grids), "no method whose maps can support a claim has maps in this run"),
        "masks": (lambda: inputs.objects is not None, "no image has a mask or a box"),
        "counterfactuals": (has_cf, "no counterfactual forwards ran (they need masks or boxes)"),
        "model": (lambda: interventions and inputs.intervener is not None, "the model is not available here"),
        "mprt": (lambda: bool(inputs.mprt), "the randomization test did not run (sanity.mprt)"),
    }
    return {need: checks[need][1] for need in sorted(needs) if not checks[need][0]()}


def run_analyses(
    inputs: AnalysisInputs, *, interventions: bool = True, execute: Executor = execute_here
) -> tuple[dict[str, Any], list[Flag]]:
    """For every analysis whose needs the run meets: measure, intervene (where the model is given and
    ``interventions``; the per-class work items through ``execute``: this process by default, the Ray actors
    under ``--backend ray``, with the run directory's item store for resuming); adjust every p-value that can
    raise a flag as one Benjamini-Hochberg family; flag.

    Returns:
        ``(analyses, flags)`` for ``summary.json`` and ``flags.json`` (flags most severe first);
        ``analyses["tests"]`` = ``{n, alpha, family: {"<analysis>/<test>": {p, q}}}``;
        ``analyses["skipped"]`` = ``{analysis: reason}`` for the analyses whose needs were not met;
        ``analyses["forwards"]`` = ``{analysis: images forwarded through the model}`` (its cost, counted);
        ``analyses["triage"]`` = ``{analysis: {class: why its full test did not run}}`` (``shortcuts.triage``;
        an analysis's measurement returns its own under the key ``triage``).
    """
    analyses: dict[str, Any] = {"target": inputs.target, "methods": inputs.methods}
    everything = registered()
    lacks = unmet(inputs, {n for a in everything for n in a.needs}, interventions)
    skipped: dict[str, str] = {}
    measured: list[tuple[Analysis, Measurement]] = []
    forwards: dict[str, int] = {}
    triage: dict[str, dict[str, str]] = {}
    for analysis in everything:
        missing = sorted(set(analysis.needs) & set(lacks))
        if missing:
            skipped[analysis.name] = "; ".join(f"needs {n}: {lacks[n]}" for n in missing)
            continue
        start, before = time.perf_counter(), _forwards(inputs)
        m = analysis.measure(inputs)
        if analysis.intervene is not None and interventions and inputs.intervener:
            m |= analysis.intervene(m, inputs)
        forwards[analysis.name] = _forwards(inputs) - before
        if analysis.per_class is not None and interventions and inputs.intervener:
            keys = analysis.per_class.classes(m, inputs)
            results, images = execute(analysis, m, inputs, keys)
            m |= analysis.per_class.gather(m, {k: results[k] for k in keys})
            forwards[analysis.name] += images
        if m.get("triage"):
            triage[analysis.name] = m["triage"]
        m.pop("triage", None)
        measured.append((analysis, m))
        seconds = time.perf_counter() - start
        log.info("analysis %s: %.1f s, %d images forwarded", analysis.name, seconds, forwards[analysis.name])
    p = {f"{a.name}/{k}": float(v) for a, m in measured if a.tests is not None for k, v in a.tests(m).items()}
    q = dict(zip(p, bh_adjust(list(p.values())), strict=True))
    ctx = FlagContext(inputs.thresholds, unreliable_methods(inputs.mprt), inputs.mprt, q)
    flags: list[Flag] = []
    for analysis, m in measured:
        flags += [downgrade_unreliable(f, ctx.unreliable) for f in analysis.flag(m, ctx)]
        analyses |= m
    analyses["tests"] = {
        "n": len(p),
        "alpha": inputs.thresholds.alpha,
        "family": {k: {"p": p[k], "q": q[k]} for k in p},
    }
    analyses["skipped"] = skipped
    analyses["forwards"] = forwards
    analyses["triage"] = triage
    return analyses, order_flags(flags)


def run_items(inputs: AnalysisInputs, execute: Executor, keep: Callable[[str, str], bool]) -> int:
    """Measure every analysis that has work items and whose needs the run meets, and run the items ``keep``
    (``keep(analysis, class)``) selects through ``execute``, flagging nothing: a shard's share of the items
    (``auditor merge --shard-id``), which :func:`run_analyses` later reads back. Returns the items run."""
    if inputs.intervener is None:
        return 0
    lacks = unmet(inputs, {n for a in registered() for n in a.needs})
    count = 0
    for analysis in registered():
        if analysis.per_class is None or set(analysis.needs) & set(lacks):
            continue
        m = analysis.measure(inputs)
        keys = [k for k in analysis.per_class.classes(m, inputs) if keep(analysis.name, k)]
        execute(analysis, m, inputs, keys)
        count += len(keys)
    return count


def _forwards(inputs: AnalysisInputs) -> int:
    return inputs.intervener.forwards if inputs.intervener is not None else 0

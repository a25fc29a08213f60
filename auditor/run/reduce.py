"""The reduce stage: committed parts + the model -> aggregates, sanity, analyses, interventions, flags, the
summary and the deep dive (the driver renders the report from them).

It reads only the run directory and the :class:`~auditor.run.setup.Plan` (for the model and the images
the interventions and the deep dive reload), so any driver (local, shards, Ray) ends with it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence

import pandas as pd
import torch
import torchvision
import yaml

from auditor.cams import CAMS
from auditor.config import dump_resolved
from auditor.metrics.registry import metric_columns
from auditor.run import aggregate, sanity
from auditor.run.access import ModelAccess
from auditor.run.deepdive import run_deepdive
from auditor.run.examples import finding_examples
from auditor.run.mapstage import MapSpec
from auditor.run.progress import stage
from auditor.run.setup import Plan, Shard, shard_of
from auditor.run.work import Runner, run_here, stored
from auditor.shortcuts.catalog import group_by_cause, run_analyses, run_items
from auditor.shortcuts.flags import Flag, flags_file
from auditor.shortcuts.registry import AnalysisInputs
from auditor.store.rundir import FLAGS, SUMMARY, RunDir, one_row_per_sample
from auditor.store.schema import SCHEMA_VERSION, Summary
from auditor.version import __version__


def map_methods(methods: Sequence[str], rundir: RunDir, target: str = "label") -> list[str]:
    """Methods whose maps support claims: class-sensitive, not pixel-space (guided) methods, with stored maps."""
    return [m for m in methods if CAMS[m].class_sensitive and CAMS[m].family != "pixel" and rundir.has_maps(m, target)]


def analysis_inputs(plan: Plan, table: pd.DataFrame, methods: Sequence[str], mprt: dict | None) -> AnalysisInputs:
    """What the analyses read; the explained target is the label unless the run only explained predictions.

    The table keeps the prediction rows (null target) of the samples no method explained, so that the
    population is every sample.
    """
    explained = table["target"].dropna()
    target = "label" if explained.empty or (explained == "label").any() else str(explained.iloc[0])
    return AnalysisInputs(
        table=table[(table["target"] == target) | table["target"].isna()],
        target=target,
        methods=map_methods(methods, plan.store, target),
        classes=plan.classes,
        metadata=plan.metadata,
        rundir=plan.store,
        thresholds=plan.cfg.thresholds,
        seed=plan.cfg.seed,
        mprt=mprt,
    )


def _header(plan: Plan, spec: MapSpec) -> Summary:
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": {
            "auditor": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "config": yaml.safe_load(dump_resolved(plan.cfg.model_copy(update={"methods": plan.methods}))),
        "run": {
            "model": plan.loaded.description,
            "device": str(plan.device),
            "layer": plan.cfg.model.target_layer,
            "limit": plan.selection.limit,
            "per_class": plan.selection.per_class,
            "only_classes": plan.selection.only_classes,
            "expensive_samples": int(spec.expensive.sum()),
            "memory_format": plan.memory_format,
            "localization": plan.localization,
            "skipped_methods": plan.skipped_methods,
        },
    }


def _deep_dive(plan: Plan, access: ModelAccess, flags: list[Flag], table: pd.DataFrame) -> list[str]:
    window = max(4, plan.cfg.data.image_size // 8)
    return run_deepdive(
        plan.store,
        flags,
        table,
        access.model,
        access.load,
        {c: i for i, c in enumerate(plan.classes)},
        plan.layer,
        plan.loaded.scripted,
        {"window": window, "stride": max(2, window // 2)},
    )


def reduce_run(
    plan: Plan, spec: MapSpec, table: pd.DataFrame, seconds: dict[str, float], runner: Runner = run_here
) -> Summary:
    """Everything dataset-level, written to ``summary.json`` and ``flags.json``; returns the summary.

    ``seconds`` collects stage timings (``analyses``, ``deep_dive``); the caller adds them to the summary.
    ``runner`` carries out the analyses' work items (this process, or the Ray actors), each kept in the run
    directory as it finishes (``run.work.stored``).
    """
    first = one_row_per_sample(table)
    columns = metric_columns(spec.metrics)
    summary = _header(plan, spec)
    summary["dataset"] = aggregate.dataset_info(
        first, plan.store.events(plan.n_batches), plan.classes, len(plan.samples)
    )
    summary["metric_columns"] = columns
    summary["accuracy"] = aggregate.accuracy(first, plan.classes, plan.cfg.seed)
    summary["aggregates"] = aggregate.aggregates(table, plan.store, plan.classes, list(columns), plan.cfg.seed)
    summary["groups"] = aggregate.groups(first, plan.metadata)
    summary["analyses"], summary["sanity"] = {}, None
    if plan.cfg.sanity is not None and not plan.loaded.scripted:
        with stage("randomization test (MPRT)"):
            summary["sanity"] = {
                "mprt": sanity.run_mprt(plan, first),
                "agreement": sanity.agreement(plan.store, table, plan.methods),
            }
    start = time.perf_counter()
    inputs = analysis_inputs(plan, table, plan.methods, summary["sanity"]["mprt"] if summary["sanity"] else None)
    access = ModelAccess(plan)  # the one model-access object of everything after the map stage
    inputs.intervener = access
    with stage(f"analyses ({len(plan.classes)} classes)"):
        try:
            summary["analyses"], flags = run_analyses(inputs, execute=stored(plan.store, runner))
        finally:
            inputs.release()
    seconds["analyses"] = time.perf_counter() - start
    start = time.perf_counter()
    with stage("finding examples"):
        findings = finding_examples(group_by_cause(flags), flags, inputs.first, access, plan.classes, plan.store)
    seconds["findings"] = time.perf_counter() - start
    plan.store.write_json(FLAGS, flags_file(flags, findings))
    start = time.perf_counter()
    with stage("deep dive"):
        summary["deep_dive"] = _deep_dive(plan, access, flags, table)
    seconds["deep_dive"] = time.perf_counter() - start
    return summary


def analyse_share(plan: Plan, table: pd.DataFrame, shard: Shard) -> int:
    """This shard's share of the analyses' work items (an item belongs to shard ``sha1("<analysis>/<class>")
    mod N``), kept in the run directory for the merge's reduce stage to read back; returns the items run."""
    inputs = analysis_inputs(plan, table, plan.methods, None)
    inputs.intervener = ModelAccess(plan)

    def mine(analysis: str, key: str) -> bool:
        return shard_of(f"{analysis}/{key}", shard.count) == shard.index

    with stage(f"analyses: shard {shard.index} of {shard.count}'s work items"):
        try:
            return run_items(inputs, stored(plan.store), mine)
        finally:
            inputs.release()


def write_summary(plan: Plan, summary: Summary) -> None:
    """``summary.json`` (the driver then renders the report from the saved files)."""
    plan.store.write_json(SUMMARY, summary)

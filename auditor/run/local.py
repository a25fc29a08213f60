"""The local driver: set-up, the map stage over every batch in this process, the flagged second pass, reduce.

A killed run restarted with the same command resumes from its last committed batch and ends with
identical ``samples.parquet``, ``maps/`` and aggregates. Data loading runs in the DataLoader's workers
(``workers``); on CUDA, batches come in pinned memory and are copied with ``non_blocking``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from auditor.cams import CAMS
from auditor.config import AuditConfig
from auditor.errors import DataError, ModelError
from auditor.io.containers import locator
from auditor.io.dataset import collate
from auditor.outputs.report import render_report
from auditor.run import flagged, mapstage
from auditor.run.mapstage import MapSpec, map_batch
from auditor.run.progress import Progress, stage
from auditor.run.reduce import analysis_inputs, reduce_run, write_summary
from auditor.run.setup import Plan, Selection, Shard, plan_run
from auditor.run.work import Runner, run_here
from auditor.shortcuts.catalog import run_analyses
from auditor.store.rundir import DONE, FLAGGED, MAIN, RUN, SHARDS, RunDir
from auditor.store.schema import Summary

log = logging.getLogger(__name__)


class Timer:
    """Seconds per stage, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def since(self, key: str, start: float) -> float:
        now = time.perf_counter()
        self.add(key, now - start)
        return now


class NonFinite:
    """Counts samples with NaN/inf logits; stops the run past ``max_nonfinite_share`` of all its samples.

    The share is of the whole run, so the stop comes as soon as the limit can no longer be met, and the
    batches committed before it stay (a rerun with a higher limit resumes from them).
    """

    def __init__(self, plan: Plan, kind: str) -> None:
        self.plan = plan
        self.count = (
            sum(
                e["reason"] == mapstage.NONFINITE
                for ev in plan.store.events(plan.n_batches, missing_ok=True)
                for e in ev["skipped"]
            )
            if kind == MAIN
            else 0
        )
        self.rows: list[int] = []

    def add(self, n: int, rows: list[int]) -> None:
        self.count += n
        self.rows += rows
        limit = self.plan.cfg.max_nonfinite_share * len(self.plan.samples)
        if n and self.count > limit:
            first = ", ".join(locator(self.plan.samples[r].path, self.plan.samples[r].member) for r in self.rows[:3])
            raise ModelError(
                f"the model returned NaN or inf logits for {self.count} of {len(self.plan.samples)} samples, more "
                f"than max_nonfinite_share = {self.plan.cfg.max_nonfinite_share} (first: {first}); check the "
                "checkpoint and data.normalize, or raise max_nonfinite_share to skip them and go on (the run resumes)"
            )


def map_spec(plan: Plan) -> MapSpec:
    """The main pass's spec: the configured expensive subset; counterfactuals on the stratified subset."""
    mode = plan.cfg.expensive.subset
    expensive = flagged.initial_subset(mode, plan.stratified)
    return MapSpec(
        cfg=plan.cfg,
        model=plan.loaded.module,
        device=plan.device,
        samples=plan.samples,
        classes=plan.classes,
        methods=plan.methods,
        metrics=plan.cfg.metric_names(),
        layer=plan.cfg.model.target_layer,
        expensive=expensive,
        probe=plan.probe,
        mean=plan.mean,
        std=plan.std,
        chunk=plan.chunk,
        faithful=tuple(plan.cfg.faithfulness_methods(plan.methods)),
        overlap=plan.device.type == "cuda" if plan.cfg.overlap == "auto" else plan.cfg.overlap,
    )


def run_batches(
    plan: Plan,
    spec: MapSpec,
    numbers: list[int],
    batches: list[list[int]],
    kind: str,
    bar: Progress | None,
    timer: Timer,
) -> int:
    """Map ``batches`` (sample rows) and commit each as part ``kind``-``number``; returns the images done.

    With ``spec.overlap`` the host side of batch k (CPU metrics, its frame, the commit) runs on a worker
    thread while this thread feeds batch k+1 to the device; parts are still committed in order.
    """
    loader = torch.utils.data.DataLoader(
        plan.dataset,
        batch_sampler=batches,
        num_workers=plan.cfg.workers,
        collate_fn=collate,
        pin_memory=plan.device.type == "cuda",
        persistent_workers=False,
    )
    nonfinite = NonFinite(plan, kind)
    processed = 0

    def finish(b: int, batch: dict[str, Any], out: mapstage.BatchOutput) -> None:
        nonlocal processed
        start = time.perf_counter()
        out.complete()
        for key, seconds in out.seconds.items():
            timer.add(key, seconds)
        commit_batch(plan, b, batch, out, kind)
        nonfinite.add(out.nonfinite, [i for i, r in out.skipped if r == mapstage.NONFINITE])
        timer.since("write", start)
        processed += out.images
        if bar is not None:
            bar.update(len(batch["index"]) + len(batch["skipped"]))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditor-host") as pool:
        waiting: Future[None] | None = None
        t = time.perf_counter()
        for b, batch in zip(numbers, loader, strict=True):
            t = timer.since("data_wait", t)
            out = map_batch(spec, batch)
            t = timer.since("compute", t)
            if waiting is not None:
                waiting.result()  # batch k-1's host side and commit, in order
            if spec.overlap:
                waiting = pool.submit(finish, b, batch, out)
            else:
                finish(b, batch, out)
            t = time.perf_counter()
        if waiting is not None:
            waiting.result()
    return processed


def commit_batch(plan: Plan, b: int, batch: dict[str, Any], out: mapstage.BatchOutput, kind: str) -> None:
    if kind == MAIN:
        rows = plan.samples
        plan.store.write_events(
            b,
            {
                "skipped": [
                    {"row": i, "path": locator(rows[i].path, rows[i].member), "reason": r} for i, r in out.skipped
                ],
                "warnings": [
                    {"row": i, "path": locator(rows[i].path, rows[i].member), "warning": w}
                    for i, w in batch["warnings"]
                ],
            },
        )
    mapstage.commit(plan.store, out, b, kind)


def _main_pass(plan: Plan, spec: MapSpec, timer: Timer, progress: bool | None) -> int:
    done = plan.store.done_batches()
    pending = [b for b in range(plan.n_batches) if b not in done]
    batches = [plan.batches[b] for b in pending]
    bar = Progress(plan.n_batches, len(done), sum(len(b) for b in plan.batches), progress)
    processed = run_batches(plan, spec, pending, batches, MAIN, bar, timer)
    bar.close()
    return processed


def _flagged_pass(plan: Plan, spec: MapSpec, table: Any, timer: Timer, progress: bool | None) -> tuple[MapSpec, Any]:
    """``expensive.subset: flagged``: re-run the samples behind the cheap pass's flags with every method."""
    chosen = flagged.saved_choice(plan.store)
    if chosen is None:
        cheap = [m for m in plan.methods if not CAMS[m].expensive]
        inputs = analysis_inputs(plan, table, cheap or plan.methods, None)
        try:
            _, flags = run_analyses(inputs)
        finally:
            inputs.release()  # its grid files, now rather than when it is collected
        chosen = flagged.select_flagged(
            flags, table, spec.probe, plan.cfg.expensive.per_class, plan.cfg.expensive.total
        )
        flagged.write_choice(plan.store, chosen)
    second = flagged.flagged_spec(spec, chosen)
    rows, bs = list(chosen), plan.cfg.batch_size
    batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
    done = plan.store.done_batches(FLAGGED)
    pending = [b for b in range(len(batches)) if b not in done]
    if rows:
        n_flags = len({f for v in chosen.values() for f in v})
        log.info("expensive methods and metrics on %d samples behind %d flag(s)", len(rows), n_flags)
    bar = Progress(len(batches), len(done), len(rows), progress) if batches else None
    run_batches(plan, second, pending, [batches[b] for b in pending], FLAGGED, bar, timer)
    if bar is not None:
        bar.close()
    return second, plan.store.consolidate(plan.n_batches, plan.methods, len(batches), keep=("cf_",))


def run_audit(
    cfg: AuditConfig,
    out: str | Path,
    *,
    force: bool = False,
    selection: Selection | None = None,
    progress: bool | None = None,
    module: torch.nn.Module | None = None,
) -> Summary:
    """Run (or resume) an audit into ``out`` and return the summary (also written to ``summary.json``).

    Args:
        cfg: validated configuration.
        out: output directory; an unfinished run there is resumed, a finished one needs ``force``.
        force: delete a previous run's files in ``out`` first.
        selection: ``--limit`` / ``--per-class`` / ``--only-classes`` restrictions.
        progress: tqdm bar (True), periodic log lines (False), or auto (a bar on a terminal).
        module: the model object, for a config whose ``model.python`` names one (:func:`auditor.audit`).
    """
    with RunDir(out).lock():
        started = time.perf_counter()
        plan = plan_run(cfg, out, force=force, selection=selection or Selection(), module=module)
        spec = map_spec(plan)
        timer = Timer()
        processed = _main_pass(plan, spec, timer, progress)
        return finish_run(plan, spec, timer, progress, started, processed)


def run_shard(
    cfg: AuditConfig,
    out: str | Path,
    shard: Shard,
    *,
    force: bool = False,
    selection: Selection | None = None,
    progress: bool | None = None,
) -> None:
    """Run (or resume) one shard's main pass into ``out/shards/<i>-of-<n>/``; ``auditor merge`` reduces them."""
    with RunDir(Path(out) / SHARDS / shard.folder).lock():
        plan = plan_run(cfg, out, force=force, selection=selection or Selection(), shard=shard)
        _main_pass(plan, map_spec(plan), Timer(), progress)
        write_shard_done(plan)


def write_shard_done(plan: Plan) -> None:
    """``done.json``: the shard's main pass is committed (what ``auditor merge`` checks)."""
    run = plan.store.read_json(RUN)
    plan.store.write_json(DONE, {"identity": run["identity"], "shard": run["shard"], "batches": plan.batches})


def prepare_table(plan: Plan, spec: MapSpec, timer: Timer, progress: bool | None) -> tuple[MapSpec, Any]:
    """The audited table: consolidate the main pass, run (or resume) the flagged pass, write
    ``expensive.json``; returns the spec of the expensive methods and the table the reduce stage reads."""
    table = plan.store.consolidate(plan.n_batches, plan.methods)
    if table.empty:
        raise DataError("no image could be audited: every sample was skipped (see parts/events-*.json)")
    if plan.cfg.expensive.subset == "flagged":
        start = time.perf_counter()
        with stage("flagged pass (the expensive methods on the flagged samples)"):
            spec, table = _flagged_pass(plan, spec, table, timer, progress)
        timer.since("flagged_pass", start)
    expensive = plan.cfg.expensive
    flagged.write_expensive(plan.store, spec, table, expensive.subset, expensive.per_class, expensive.total)
    return spec, table


def finish_run(
    plan: Plan,
    spec: MapSpec,
    timer: Timer,
    progress: bool | None,
    started: float,
    processed: int,
    runner: Runner = run_here,
) -> Summary:
    """Everything after the main pass: the table (:func:`prepare_table`), reduce (the analyses' work items
    through ``runner``), summary, report (every driver ends here)."""
    main_pass = sum(timer.seconds.get(k, 0.0) for k in ("data_wait", "compute", "write"))
    spec, table = prepare_table(plan, spec, timer, progress)
    summary = reduce_run(plan, spec, table, timer.seconds, runner)
    summary["timings"] = {
        **{k: round(v, 3) for k, v in sorted(timer.seconds.items())},
        "total_s": round(time.perf_counter() - started, 3),
        "images_this_session": processed,
        # the main pass only: the flagged pass re-runs a few samples with the expensive methods
        "images_per_s_this_session": round(processed / max(main_pass, 1e-9), 2),
    }
    write_summary(plan, summary)
    with stage("report"):
        render_report(plan.store.root)  # from the saved files only, as `auditor report` does
    return summary


__all__ = ["Selection", "Shard", "run_audit", "run_shard"]

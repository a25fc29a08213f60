"""The Ray Data driver: ``auditor run CFG --out DIR --backend ray [--address A] [--actors N]``.

One dataset row is one audit batch (its index and sample rows). An actor pool loads the model once per
actor and calls the same map stage as the local loop. The driver commits every part under its batch
index (a batch that Ray retries is overwritten, never counted twice; a rerun skips committed batches),
retries a batch that failed once, stops naming the samples of a batch that failed twice, checks that
every batch is committed, then runs the same reduce stage as a local run, with the analyses' work items
(one class's scan, border test, colour shift or confirmation) on a second pool of as many actors
(:class:`WorkActor`, :class:`RayRunner`): the driver measures, the actors intervene, the driver keeps each
item's result in the run directory as it arrives and flags. The actors read the run directory's maps and
object grids, so on a cluster of several machines it must be on a shared filesystem.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from auditor.config import AuditConfig, dump_resolved, parse_config
from auditor.errors import ConfigError, ModelError
from auditor.io.dataset import collate
from auditor.run import mapstage
from auditor.run.access import ModelAccess
from auditor.run.local import NonFinite, Timer, commit_batch, finish_run, map_spec
from auditor.run.progress import Progress
from auditor.run.setup import Plan, Selection, plan_run
from auditor.run.work import encode
from auditor.shortcuts.catalog import ANALYSES
from auditor.shortcuts.registry import Analysis, AnalysisInputs, Measurement
from auditor.store.rundir import MAIN, RunDir, RunStore
from auditor.store.schema import Summary

log = logging.getLogger(__name__)
ATTEMPTS = 2  # a batch that fails this many times stops the run


def _actor_plan(config: str, selection: list[Any], device: str) -> Plan:
    """The run planned once on an actor (model, dataset), in a scratch folder of its own."""
    torch.set_num_threads(1)  # one thread per worker: two-thread workers on shared cores ran ~10x slower
    cfg = parse_config(yaml.safe_load(config), base=Path.cwd(), source="ray driver config")
    cfg = cfg.model_copy(update={"device": device})
    scratch = tempfile.mkdtemp(prefix="auditor-actor-")
    return plan_run(cfg, scratch, force=True, selection=Selection(*selection))


class MapActor:
    """A Ray actor: plans the run once (model, dataset, spec) in a scratch folder, then maps batches."""

    def __init__(self, config: str, selection: list[Any], device: str) -> None:
        plan = _actor_plan(config, selection, device)
        self.dataset = plan.dataset
        self.spec = map_spec(plan)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for sample_rows in rows["rows"]:
            try:
                batch = collate([self.dataset[int(r)] for r in sample_rows])
                out = mapstage.map_batch(self.spec, batch).complete()
                seen = len(batch["index"]) + len(batch["skipped"])
                payloads.append(pickle.dumps(("ok", out, batch["warnings"], seen)))
            except Exception as err:  # reported to the driver, which retries the batch or stops naming it
                payloads.append(pickle.dumps(("error", f"{type(err).__name__}: {err}", None, 0)))
        return {"batch": rows["batch"], "payload": np.array(payloads, dtype=object)}


class WorkActor:
    """A Ray actor for the analyses' work items: the run planned once, its model access reading the run
    directory ``out`` (maps for the colour shifts' spared pixels), and the driver's analysis inputs."""

    def __init__(self, config: str, selection: list[Any], device: str, out: str, inputs: AnalysisInputs) -> None:
        plan = _actor_plan(config, selection, device)
        self.access = ModelAccess(replace(plan, store=RunStore(out, len(plan.samples))))
        inputs.intervener = self.access
        self.inputs = inputs

    def run(self, name: str, measured: Measurement, key: str) -> tuple[str, str, int]:
        """One item: ``(class, encoded result, images forwarded)``, as ``run.work.run_here`` gives it."""
        work = ANALYSES[name].per_class
        assert work is not None
        before = self.access.forwards
        result = work.run(measured, self.inputs, key)
        return key, encode(result), self.access.forwards - before

    def release(self) -> None:
        """Remove this actor's analysis grid files (see ``AnalysisInputs.release``)."""
        self.inputs.release()


class RayRunner:
    """A ``run.work.Runner`` on a pool of :class:`WorkActor` (started on the first item, stopped by :meth:`close`)."""

    def __init__(self, ray: Any, config: str, selection: list[Any], out: Path, actors: int, gpus: float) -> None:
        self.ray, self.config, self.selection, self.out = ray, config, selection, out
        self.actors, self.gpus = actors, gpus
        self.pool: Any = None
        self.handles: list[Any] = []

    def _start(self, inputs: AnalysisInputs) -> Any:
        ray = self.ray
        shipped = replace(inputs, rundir=RunDir(self.out), intervener=None, _memo={})  # the fields, no caches
        ref = ray.put(shipped)
        device = "cuda" if self.gpus > 0 else "cpu"
        remote = ray.remote(num_cpus=1, num_gpus=self.gpus)(WorkActor)
        self.handles = [
            remote.remote(self.config, self.selection, device, str(self.out), ref) for _ in range(self.actors)
        ]
        return ray.util.ActorPool(self.handles)

    def __call__(
        self, analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
    ) -> Iterator[tuple[str, str, int]]:
        if not keys:
            return
        self.pool = self.pool or self._start(inputs)
        ref = self.ray.put(measured)
        try:
            yield from self.pool.map_unordered(lambda actor, key: actor.run.remote(analysis.name, ref, key), keys)
        except self.ray.exceptions.RayError as err:
            cause = str(err).strip().splitlines()[-1]
            raise ModelError(f"analysis {analysis.name}: a work item failed on the Ray workers: {cause}") from None

    def close(self) -> None:
        """Stop the actors, each first removing its grid files from the run directory (a killed process runs
        no exit handler)."""
        try:
            self.ray.get([handle.release.remote() for handle in self.handles])
        except self.ray.exceptions.RayError as err:  # an actor already lost: the next --force run removes its files
            log.warning("a Ray work actor could not remove its analysis files: %s", str(err).strip().splitlines()[-1])
        for handle in self.handles:
            self.ray.kill(handle)
        self.pool, self.handles = None, []


def _init(address: str | None) -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'auditor[ray]'") from None
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address is None:  # a local Ray: its own temp folder (Ray's default is shared by every Ray here)
            options["_temp_dir"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ray.init(address=address, **options)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 600
    return ray


def _map(ray: Any, config: str, selection: list[Any], items: list[dict[str, Any]], actors: int, gpus: float) -> Any:
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        MapActor,
        fn_constructor_kwargs={"config": config, "selection": selection, "device": "cuda" if gpus > 0 else "cpu"},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus,
        batch_format="numpy",
    )


def _rows(ray: Any, dataset: Any) -> Any:
    """The results as they stream in; a pool that cannot run at all (an actor that cannot even load the
    model, say) is one message naming the cause."""
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as err:
        cause = str(err).strip().splitlines()[-1]
        raise ModelError(f"the Ray workers failed: {cause}") from None


def run_ray(
    cfg: AuditConfig,
    out: str | Path,
    *,
    force: bool = False,
    selection: Selection | None = None,
    progress: bool | None = None,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
) -> Summary:
    """Run (or resume) an audit with the map stage on a Ray actor pool; returns the summary."""
    if actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {actors}")
    with RunDir(out).lock():
        started = time.perf_counter()
        plan = plan_run(cfg, out, force=force, selection=selection or Selection())
        spec = map_spec(plan)
        config = dump_resolved(
            plan.cfg.model_copy(update={"methods": plan.methods, "memory_format": plan.memory_format})
        )
        chosen = [plan.selection.limit, plan.selection.per_class, plan.selection.only_classes]
        ray = _init(address)
        timer, nonfinite = Timer(), NonFinite(plan, MAIN)
        done = plan.store.done_batches()
        pending = [b for b in range(plan.n_batches) if b not in done]
        bar = Progress(plan.n_batches, len(done), sum(len(b) for b in plan.batches), progress)
        failures: dict[int, str] = {}
        processed = 0
        for _attempt in range(ATTEMPTS):
            if not pending:
                break
            items = [{"batch": b, "rows": plan.batches[b]} for b in pending]
            failures = {}
            for row in _rows(ray, _map(ray, config, chosen, items, actors, gpus_per_actor)):
                b = int(row["batch"])
                status, value, warnings, seen = pickle.loads(row["payload"])
                if status == "error":
                    failures[b] = value
                    continue
                commit_batch(plan, b, {"warnings": warnings}, value, MAIN)
                nonfinite.add(value.nonfinite, [i for i, r in value.skipped if r == mapstage.NONFINITE])
                for key, seconds in value.seconds.items():
                    timer.add(key, seconds)
                processed += value.images
                bar.update(seen)
            pending = sorted(failures)
            if pending:
                log.warning("batches %s failed on a worker; retrying them", pending)
        bar.close()
        if failures:
            b, why = next(iter(sorted(failures.items())))
            ids = [plan.samples[r].id for r in plan.batches[b]]
            raise ModelError(f"batch {b} failed {ATTEMPTS} times on the workers ({why}); its samples: {ids}")
        missing = [b for b in range(plan.n_batches) if b not in plan.store.done_batches()]
        if missing:
            raise ModelError(f"batches {missing} were never committed by the workers; rerun to resume")
        timer.add("compute", time.perf_counter() - started)
        runner = RayRunner(ray, config, chosen, Path(out), actors, gpus_per_actor)
        try:
            return finish_run(plan, spec, timer, progress, started, processed, runner)
        finally:
            runner.close()

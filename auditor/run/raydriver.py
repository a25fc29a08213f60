"""The Ray Data driver: ``auditor run CFG --out DIR --backend ray [--address A] [--actors N]``.

One dataset row is one audit batch (its index and sample rows). An actor pool loads the model once per
actor and calls the same map stage as the local loop. The driver commits every part under its batch
index (a batch that Ray retries is overwritten, never counted twice; a rerun skips committed batches),
retries a batch that failed once, stops naming the samples of a batch that failed twice, checks that
every batch is committed, then runs the same reduce stage as a local run.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from auditor.config import AuditConfig, dump_resolved, parse_config
from auditor.errors import ConfigError, ModelError
from auditor.io.dataset import collate
from auditor.run import mapstage
from auditor.run.local import NonFinite, Timer, commit_batch, finish_run, map_spec
from auditor.run.progress import Progress
from auditor.run.setup import Selection, plan_run
from auditor.store.rundir import MAIN, RunDir
from auditor.store.schema import Summary

log = logging.getLogger(__name__)
ATTEMPTS = 2  # a batch that fails this many times stops the run


class MapActor:
    """A Ray actor: plans the run once (model, dataset, spec) in a scratch folder, then maps batches."""

    def __init__(self, config: str, selection: list[Any], device: str) -> None:
        torch.set_num_threads(1)  # one thread per worker: two-thread workers on shared cores ran ~10x slower
        cfg = parse_config(yaml.safe_load(config), base=Path.cwd(), source="ray driver config")
        cfg = cfg.model_copy(update={"device": device})
        self.scratch = tempfile.mkdtemp(prefix="auditor-actor-")
        plan = plan_run(cfg, self.scratch, force=True, selection=Selection(*selection))
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
        return finish_run(plan, spec, timer, progress, started, processed)

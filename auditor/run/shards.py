"""Sharded runs: ``auditor run ... --num-shards N --shard-id I`` in N processes, then ``auditor merge DIR``.

A sample belongs to shard ``sha1(id) mod N`` (never a padded sampler: no sample is audited twice). Every
shard plans the whole run (the expensive subset and the counterfactual partners are chosen from the whole
sample list, identically), maps its own samples into ``DIR/shards/<i>-of-<n>/`` and resumes on its own.
:func:`merge` checks that every shard is complete and belongs to the same run, gathers their parts and
arrays into ``DIR`` and runs the rest exactly as a one-process run does (the flagged pass, the reduce
stage, the report). The analyses' work items can be shared out too: ``auditor merge DIR --num-shards N
--shard-id I`` in N processes (:func:`merge_share`) runs each one's share and keeps it under ``DIR/items/``;
the final ``auditor merge DIR`` reads them back and reduces.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from auditor.config import AuditConfig, parse_config
from auditor.errors import ConfigError
from auditor.run.local import Timer, finish_run, map_spec, prepare_table
from auditor.run.reduce import analyse_share
from auditor.run.setup import Plan, Selection, Shard, plan_run, shard_of
from auditor.store.rundir import DONE, MERGED, RESOLVED, RUN, SHARDS, SUMMARY, RunDir
from auditor.store.schema import Summary


def shard_from_env(num_shards: int | None, shard_id: int | None) -> Shard | None:
    """The shard of this process: the arguments, else torchrun's ``WORLD_SIZE``/``RANK``, else SLURM's
    array (``SLURM_ARRAY_TASK_COUNT``/``_ID``, from ``_MIN``) or task (``SLURM_NTASKS``/``SLURM_PROCID``)."""
    env = os.environ
    if num_shards is None and shard_id is None:
        if "WORLD_SIZE" in env and "RANK" in env:
            num_shards, shard_id = int(env["WORLD_SIZE"]), int(env["RANK"])
        elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            num_shards, shard_id = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - first
        elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
            num_shards, shard_id = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
    if num_shards is None and shard_id is None:
        return None
    if num_shards is None or shard_id is None:
        raise ConfigError("give both --num-shards and --shard-id (or neither)")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"--shard-id must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_id}")
    return None if num_shards == 1 else Shard(shard_id, num_shards)


def _shard_dirs(out: Path) -> tuple[int, list[RunDir]]:
    """The shard folders of ``out`` (all of one ``N``), in shard order; missing or unfinished ones named."""
    found = sorted((out / SHARDS).glob("*-of-*")) if (out / SHARDS).is_dir() else []
    counts = {p.name.split("-of-")[1] for p in found}
    if len(counts) != 1:
        what = "no shard folder" if not counts else f"shards of different counts {sorted(counts)}"
        raise ConfigError(
            f"{out} holds {what} under {SHARDS}/; run every 'auditor run ... --num-shards N --shard-id I'"
        )
    n = int(counts.pop())
    dirs = [RunDir(out / SHARDS / f"{i}-of-{n}") for i in range(n)]
    missing = [d.root.name for d in dirs if not d.root.is_dir()]
    unfinished = [d.root.name for d in dirs if d.root.is_dir() and not d.has(DONE)]
    if missing or unfinished:
        raise ConfigError(
            f"{out}: shard(s) {missing} missing and {unfinished} unfinished; run (or resume) them, then merge"
        )
    identities = {d.read_json(DONE)["identity"] for d in dirs}
    if len(identities) != 1:
        raise ConfigError(f"{out}: the shards come from different configs or sample lists; rerun them with one config")
    return n, dirs


def _gather(plan: Plan, dirs: list[RunDir], n: int) -> None:
    """Copy the shards' parts and events (renumbered in shard order) and their rows of every array."""
    store = plan.store
    k = 0
    for d in dirs:
        for b in range(len(d.read_json(DONE)["batches"])):
            shutil.copyfile(d.part_path(b), store.part_path(k))
            shutil.copyfile(d.events_path(b), store.events_path(k))
            k += 1
    owner = np.array([shard_of(s.id, n) for s in plan.samples])
    for i, d in enumerate(dirs):
        rows = np.flatnonzero(owner == i)
        for sub in ("maps", "curves"):
            for path in sorted((d.root / sub).glob("*.npy")):
                src = np.load(path, mmap_mode="r")
                dst = store.array(f"{sub}/{path.stem}", tuple(src.shape[1:]), str(src.dtype))
                dst[rows] = src[rows]
    store.flush()


def _merged_plan(out: Path, dirs: list[RunDir], n: int) -> Plan:
    """The plan of the merged run in ``out``: its shards' parts and arrays gathered there, once. A merge that
    finds them already gathered from the same shards (``merged.json``) and no finished run resumes from them
    (the flagged pass's batches, the analyses' work items); otherwise everything is gathered again."""
    raw = yaml.safe_load((dirs[0].root / RESOLVED).read_text())
    cfg: AuditConfig = parse_config(raw, base=dirs[0].root, source=str(dirs[0].root / RESOLVED))
    limit, per_class, only = dirs[0].read_json(RUN)["selection"]
    batches = [b for d in dirs for b in d.read_json(DONE)["batches"]]
    done = [d.read_json(DONE) for d in dirs]
    here = RunDir(out)
    reuse = here.has(MERGED) and not here.has(SUMMARY) and here.read_json(MERGED) == done
    # not reused: an earlier merge's files (parts, maps, items, summary) are removed and gathered again
    plan = plan_run(cfg, out, force=not reuse, selection=Selection(limit, per_class, only), batches=batches)
    if plan.store.read_json(RUN)["identity"] != dirs[0].read_json(DONE)["identity"]:
        raise ConfigError(f"{out}: the shards were run on other data or another config than their own; rerun them")
    if not reuse:
        _gather(plan, dirs, n)
        plan.store.write_json(MERGED, done)
    return plan


def merge(out: str | Path, *, progress: bool | None = None) -> Summary:
    """Reduce a sharded run in ``out`` once every shard is complete; returns the summary. The analyses' work
    items that :func:`merge_share` processes computed are read back, the rest are run here."""
    out = Path(out)
    n, dirs = _shard_dirs(out)
    with RunDir(out).lock():
        started = time.perf_counter()
        plan = _merged_plan(out, dirs, n)
        return finish_run(plan, map_spec(plan), Timer(), progress, started, 0)


def merge_share(out: str | Path, shard: Shard, *, progress: bool | None = None) -> int:
    """``auditor merge OUT --num-shards N --shard-id I``: the analyses' work items of shard ``I`` of ``N``,
    in N processes, after every map shard is complete and before the final ``auditor merge OUT``.

    The first process to take the lock gathers the shards and runs the flagged pass; the others wait for it
    and resume from what it gathered. Each then runs its share of the items without the lock and writes them
    under ``items/``. Returns the number of items this process ran or read back.
    """
    out = Path(out)
    n, dirs = _shard_dirs(out)
    with RunDir(out).lock(wait=True):
        plan = _merged_plan(out, dirs, n)
        _, table = prepare_table(plan, map_spec(plan), Timer(), progress)
    return analyse_share(plan, table, shard)

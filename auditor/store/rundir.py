"""The run directory: every path and file format under ``--out``, and nothing else spells a file name.

Every file is written to a temporary name and renamed, so a run killed at any point (Ctrl-C, kill -9)
leaves only complete files. A batch is "done" exactly when its parquet part exists; its maps and curves
are flushed before that part is written, so a resumed run recomputes only unfinished batches and ends with
the same bytes as an uninterrupted one.

Layout::

    .lock                      PID and host of the run that holds the directory
    shards/<i>-of-<n>/         a shard's own run directory (run.json, parts/, maps/, curves/, done.json)
    merged.json                the shards' done.json records gathered here by ``auditor merge``
    run.json                   identity of the run (config + sample list) and settings kept on resume
    parts/part-<b>.parquet     rows of batch b of the main pass (committed = done)
    parts/events-<b>.json      skipped files and warnings of batch b
    parts/flagged-<b>.parquet  rows of batch b of the flagged second pass
    items/<analysis>/<key>.json     one analysis work item's result (an interrupted analysis stage resumes)
    maps/<method>__<target>.npy     [n, h, w] float16 low-resolution maps
    maps/_object.npy                [n, 32, 32] float16 object masks on the analysis grid
    maps/deepdive.npz               arrays of the per-sample deep dive
    curves/<curve>__<method>__<target>.npy   [n, steps] float32 per-sample curves
    samples.parquet  summary.json  flags.json  expensive.json  deepdive.json  config.resolved.yaml
    report.html

This module imports no torch: ``auditor gate``, ``report`` and ``compare`` read runs through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditor.errors import ConfigError
from auditor.store.rows import DiskRows

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
FLAGS = "flags.json"
EXPENSIVE = "expensive.json"
RUN = "run.json"
DEEPDIVE = "deepdive.json"
RESOLVED = "config.resolved.yaml"
SAMPLES = "samples.parquet"
REPORT = "report.html"
GATE = "gate.json"
DONE = "done.json"  # a shard's main pass is committed
MERGED = "merged.json"  # the shards' done.json records whose parts and arrays a merge gathered here
LOCK_POLL_S = 1.0
SHARDS = "shards"
LOCK = ".lock"
MAIN, FLAGGED = "part", "flagged"  # kinds of parquet parts
ITEMS = "items"  # the analyses' work items
SCRATCH = ".analysis-"  # prefix of a process's directory of analysis grid files (removed when it is done)
_ARTIFACTS = (
    REPORT,
    DEEPDIVE,
    "parts",
    "maps",
    "curves",
    ITEMS,
    MERGED,
    SAMPLES,
    SUMMARY,
    FLAGS,
    RESOLVED,
    RUN,
    EXPENSIVE,
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars/arrays by Python values (NaN is written as null)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


_SCALAR = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
_SCALAR_ARRAY = re.compile(rf"\[\n\s*{_SCALAR}(?:,\n\s*{_SCALAR})*\n\s*\]")


def dumps(obj: Any) -> str:
    """``obj`` as indented JSON with NaN as null, each array of numbers on one line: indented one number a line,
    the grids of a 100-class ``summary.json`` took 12 MB, three quarters of it spaces. (Only arrays the indenting
    spread over lines are joined; a newline never occurs inside a JSON string, so no string is touched.)"""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return _SCALAR_ARRAY.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(0)[1:-1].split(",")) + "]", text)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as :func:`dumps` does."""
    atomic_write_bytes(path, dumps(obj).encode("utf-8") + b"\n")


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # being written right now, or damaged


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process still runs (a lock from another host is assumed alive)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return bool(holder)  # another host: cannot check; empty or damaged: stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(path: Path, wait: bool = False) -> None:
    takeovers, waiting = 0, False
    while takeovers < 3:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _alive(holder) and wait:
                if not waiting:
                    log.info("waiting for the lock %s (PID %s)", path, holder.get("pid"))
                    waiting = True
                time.sleep(LOCK_POLL_S)
                continue
            if _alive(holder):
                raise ConfigError(
                    f"{path.parent} is in use by another auditor run (PID {holder.get('pid')} on "
                    f"{holder.get('host')}); wait for it, choose another --out, or delete {path} if that "
                    "process is gone"
                ) from None
            log.warning("taking over the stale lock %s of PID %s", path, holder.get("pid"))
            path.unlink(missing_ok=True)
            takeovers += 1
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
        return
    raise ConfigError(f"could not take the lock {path}: another run keeps taking it")


def map_key(method: str, target: str) -> str:
    """``<method>__<target>``: the name of a method's maps (and the suffix of its curves)."""
    return f"{method}__{target}"


class RunDir:
    """Paths and readers of one run directory (no state beyond the root).

    Args:
        root: the ``--out`` directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------------------ file names
    def map_path(self, method: str, target: str) -> Path:
        return self.root / "maps" / f"{map_key(method, target)}.npy"

    def curve_path(self, curve: str, method: str, target: str) -> Path:
        return self.root / "curves" / f"{curve}__{map_key(method, target)}.npy"

    @property
    def objects_path(self) -> Path:
        return self.root / "maps" / "_object.npy"

    @property
    def deepdive_arrays_path(self) -> Path:
        return self.root / "maps" / "deepdive.npz"

    @property
    def findings_arrays_path(self) -> Path:
        """``maps/findings.npz``: each finding's intervention images, ``[2, S, S, 3]`` uint8 (before, after)
        under the example's key (``/`` written as ``~``)."""
        return self.root / "maps" / "findings.npz"

    def part_path(self, batch: int, kind: str = MAIN) -> Path:
        """``parts/<kind>-<batch>.parquet``; kind ``part`` = the main pass, ``flagged`` = the second pass."""
        return self.parts / f"{kind}-{batch:06d}.parquet"

    def item_path(self, analysis: str, key: str) -> Path:
        """``items/<analysis>/<sha1 of key>.json``: one work item's result (a class name may hold any character)."""
        return self.root / ITEMS / analysis / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"

    def events_path(self, batch: int) -> Path:
        return self.parts / f"events-{batch:06d}.json"

    # ------------------------------------------------------------------------------ readers
    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_json(self, name: str) -> Any:
        """A JSON file of the run; a missing, truncated or corrupt one is a :class:`ConfigError` naming it."""
        path = self.root / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing: {self.root} is not a finished run; run 'auditor run'") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"{path} cannot be read ({err}); the run was interrupted or the file damaged: run 'auditor run' "
                "again with the same --out (it resumes) or with --force"
            ) from None

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.root / name, obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def read_table(self) -> pd.DataFrame:
        """``samples.parquet``; a missing or damaged file is a :class:`ConfigError` naming it."""
        path = self.root / SAMPLES
        if not path.is_file():
            raise ConfigError(f"{path} is missing: {self.root} is not a finished run; run 'auditor run'")
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{path} cannot be read ({err}); run 'auditor run' again with the same --out (it resumes)"
            ) from None

    @contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        """Hold ``<out>/.lock`` (PID and host) for a run: a second run on the same ``--out`` is refused, or,
        with ``wait``, waits until the first lets go (the shards of ``auditor merge --shard-id``).

        A lock left by a process that no longer exists on this host is taken over. A folder created here
        and left empty (a start that failed validation) is removed again.
        """
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        _acquire(path, wait)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()

    def read_flags(self) -> list[dict[str, Any]]:
        """``flags.json``'s flags (empty when the file is absent)."""
        return list(self.read_json(FLAGS)["flags"]) if self.has(FLAGS) else []

    def read_findings(self) -> list[dict[str, Any]]:
        """``flags.json``'s findings (empty when absent: runs written before findings existed)."""
        return list(self.read_json(FLAGS).get("findings", [])) if self.has(FLAGS) else []

    def has_maps(self, method: str, target: str) -> bool:
        return self.map_path(method, target).exists()

    def load_maps(self, method: str, target: str) -> np.ndarray | None:
        """``[n, h, w]`` float16 memmap of a method's maps, or None when the run has none."""
        path = self.map_path(method, target)
        return np.load(path, mmap_mode="r") if path.exists() else None

    def load_curves(self, curve: str, method: str, target: str) -> np.ndarray | None:
        path = self.curve_path(curve, method, target)
        return np.load(path, mmap_mode="r") if path.exists() else None

    def load_objects(self) -> np.ndarray | None:
        """``[n, 32, 32]`` object masks on the analysis grid, or None when no sample had a mask."""
        return np.load(self.objects_path, mmap_mode="r") if self.objects_path.exists() else None

    def map_rows(self, method: str, target: str) -> DiskRows | None:
        """A method's maps read a selection at a time and let go after (the reduce stage's passes over a large
        run); None when the run has none."""
        path = self.map_path(method, target)
        return DiskRows(path) if path.exists() else None

    def object_rows(self) -> DiskRows | None:
        """The object grids read a selection at a time (:meth:`load_objects` maps them whole)."""
        return DiskRows(self.objects_path) if self.objects_path.exists() else None

    def done_batches(self, kind: str = MAIN) -> set[int]:
        """Indices of the batches of ``kind`` whose part exists."""
        return {int(p.stem.split("-")[1]) for p in self.parts.glob(f"{kind}-*.parquet")}

    def events(self, batches: int, missing_ok: bool = False) -> list[dict[str, Any]]:
        """The events of batches ``0..batches-1`` (``missing_ok``: skip batches not yet committed)."""
        paths = [self.events_path(b) for b in range(batches)]
        return [json.loads(p.read_text()) for p in paths if not missing_ok or p.exists()]

    # ------------------------------------------------------------------------------ set-up
    def check_finished(self, force: bool) -> None:
        """A finished run is only overwritten with ``force`` (checked before anything is written)."""
        if (self.root / SUMMARY).exists() and not force:
            raise ConfigError(f"{self.root} holds a finished run; pass --force to overwrite it or choose another --out")

    def prepare(self, force: bool) -> None:
        """Create the directory; ``force`` deletes every earlier artifact."""
        self.check_finished(force)
        if force:
            for name in _ARTIFACTS:
                path = self.root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            for path in self.root.glob(f"{SCRATCH}*"):  # the analyses' grid files of a process that was killed
                shutil.rmtree(path, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)


class RunStore(RunDir):
    """The writing side of a run directory: atomic parquet parts and ``[n, ...]`` ``.npy`` memmaps.

    Args:
        root: the ``--out`` directory.
        n: number of samples in the run (rows of every array).
    """

    def __init__(self, root: str | Path, n: int) -> None:
        super().__init__(root)
        self.n = n
        self.parts.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, np.memmap] = {}

    def write_part(self, batch: int, frame: pd.DataFrame, kind: str = MAIN) -> None:
        """Atomically write one batch's rows (after flushing every array it touched)."""
        self.flush()
        atomic_write_bytes(self.part_path(batch, kind), _parquet(frame))

    def write_events(self, batch: int, events: dict[str, Any]) -> None:
        write_json(self.events_path(batch), events)

    def consolidate(
        self, batches: int, methods: list[str], flagged: int = 0, keep: tuple[str, ...] = ()
    ) -> pd.DataFrame:
        """Gather parts 0..batches-1 into ``samples.parquet`` (canonical order) and return the table.

        The table is ordered by method (in ``methods`` order), target, then row: the same table whatever
        the batch layout or sharding that produced the parts. The ``flagged`` parts of a second pass
        (``expensive.subset: flagged``) hold every row of the samples they cover, so they replace those
        samples' rows of the main pass, except for the per-sample columns whose names start with a
        prefix in ``keep``: those stay the main pass's.
        """
        table = _concat([pd.read_parquet(self.part_path(b)) for b in range(batches) if self.part_path(b).exists()])
        second = _concat([pd.read_parquet(self.part_path(b, FLAGGED)) for b in range(flagged)])
        if len(second) and len(table):
            table = _replace_rows(table, second, keep)
        if len(table):
            rank = {m: i for i, m in enumerate(methods)}
            key = table["method"].map(rank) * 2 + (table["target"] != "label")
            table = table.assign(_key=key).sort_values(["_key", "row"], kind="stable").drop(columns="_key")
            table = table.reset_index(drop=True)
        atomic_write_bytes(self.root / SAMPLES, _parquet(table))
        return table

    def maps(self, key: str, tail: tuple[int, ...]) -> np.memmap:
        """``maps/<key>`` where ``key`` is :func:`map_key`."""
        return self.array(f"maps/{key}", tail, "float16")

    def curves(self, curve: str, key: str, tail: tuple[int, ...]) -> np.memmap:
        """``curves/<curve>__<key>`` where ``key`` is :func:`map_key`."""
        return self.array(f"curves/{curve}__{key}", tail, "float32")

    def objects(self, tail: tuple[int, ...]) -> np.memmap:
        return self.array("maps/_object", tail, "float16")

    def array(self, name: str, tail: tuple[int, ...], dtype: str) -> np.memmap:
        """The ``[n, *tail]`` array ``<root>/<name>.npy`` (created NaN-filled, else opened read-write)."""
        if name in self._arrays:
            arr = self._arrays[name]
            if tuple(arr.shape[1:]) != tuple(tail):
                raise ValueError(f"array {name} has rows of shape {arr.shape[1:]}, got {tail}")
            return arr
        path = self.root / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            arr = np.load(path, mmap_mode="r+")
            if tuple(arr.shape) != (self.n, *tail):
                raise ValueError(f"{path} has shape {arr.shape}, expected {(self.n, *tail)}; use --force")
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.n, *tail))
            arr[:] = np.nan
            arr.flush()
            os.replace(tmp, path)
            arr = np.load(path, mmap_mode="r+")
        self._arrays[name] = arr
        return arr

    def flush(self) -> None:
        for arr in self._arrays.values():
            arr.flush()


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = frame.to_parquet(index=False)
    if buf is None:  # to_parquet without a path returns bytes
        raise RuntimeError("pandas returned no parquet bytes")
    return buf


def one_row_per_sample(table: pd.DataFrame) -> pd.DataFrame:
    """One row per audited sample, whatever the methods: each sample's first row in the table's order, by row.

    An expensive method has rows only for the expensive subset, so no one method's rows are the population
    (``methods: [occlusion, grad_cam]`` once made occlusion's subset the population of accuracy,
    ``dataset.n``, ``dataset.id`` and the analyses). The columns a sample's rows share (label, prediction,
    probes, metadata) are equal in each of its rows.
    """
    return table.drop_duplicates("row", keep="first").sort_values("row", kind="stable")


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _replace_rows(table: pd.DataFrame, redo: pd.DataFrame, keep: tuple[str, ...]) -> pd.DataFrame:
    """``table`` with the samples of ``redo`` replaced, keeping ``table``'s columns with a prefix in ``keep``."""
    main = one_row_per_sample(table).set_index("row")
    for col in [c for c in table.columns if keep and c.startswith(keep)]:
        redo[col] = redo["row"].map(main[col]).to_numpy()
    return pd.concat([table[~table["row"].isin(redo["row"])], redo], ignore_index=True)

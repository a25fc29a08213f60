"""The run directory: atomic parquet parts, ``.npy`` memmaps for maps and curves, JSON results.

Every file is written to a temporary name and renamed, so a run killed at any point (Ctrl-C, kill -9)
leaves only complete files. A batch is "done" exactly when its parquet part exists; its maps and curves
are flushed before that part is written, so a resumed run recomputes only unfinished batches and ends with
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


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


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON with NaN as null."""
    atomic_write_bytes(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False).encode("utf-8") + b"\n")


class RunStore:
    """Files of one run directory.

    Args:
        root: the ``--out`` directory.
        n: number of samples in the run (rows of every array).
    """

    def __init__(self, root: Path, n: int) -> None:
        self.root = root
        self.n = n
        self.parts = root / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, np.memmap] = {}

    # parquet parts ---------------------------------------------------------------------------
    def part_path(self, batch: int, kind: str = "part") -> Path:
        """``parts/<kind>-<batch>.parquet``; kind ``part`` = the main pass, ``flagged`` = the second pass."""
        return self.parts / f"{kind}-{batch:06d}.parquet"

    def done_batches(self, kind: str = "part") -> set[int]:
        """Indices of the batches of ``kind`` whose part exists."""
        return {int(p.stem.split("-")[1]) for p in self.parts.glob(f"{kind}-*.parquet")}

    def write_part(self, batch: int, frame: pd.DataFrame, kind: str = "part") -> None:
        """Atomically write one batch's rows (after flushing every array it touched)."""
        self.flush()
        buf = frame.to_parquet(index=False)
        assert buf is not None  # to_parquet without a path returns bytes
        atomic_write_bytes(self.part_path(batch, kind), buf)

    def consolidate(self, batches: int, flagged: int = 0, keep: tuple[str, ...] = ()) -> pd.DataFrame:
        """Concatenate parts 0..batches-1 in order into ``samples.parquet`` and return the table.

        The ``flagged`` parts of a second pass (``expensive.subset: flagged``) hold every row of the
        samples they cover, so they replace those samples' rows of the main pass, except for the
        per-sample columns whose names start with a prefix in ``keep``: those stay the main pass's.
        """
        frames = [pd.read_parquet(self.part_path(b)) for b in range(batches) if self.part_path(b).exists()]
        frames = [f for f in frames if len(f)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        second = [pd.read_parquet(self.part_path(b, "flagged")) for b in range(flagged)]
        second = [f for f in second if len(f)]
        if second and len(table):
            redo = pd.concat(second, ignore_index=True)
            main = table.drop_duplicates("row").set_index("row")
            for col in [c for c in table.columns if c.startswith(keep) and keep]:
                redo[col] = redo["row"].map(main[col]).to_numpy()
            table = pd.concat([table[~table["row"].isin(redo["row"])], redo], ignore_index=True)
            pairs = list(zip(table["method"], table["target"], strict=True))
            order = {pair: i for i, pair in enumerate(dict.fromkeys(pairs))}
            key = [order[pair] for pair in pairs]
            table = table.assign(_key=key).sort_values(["_key", "row"], kind="stable").drop(columns="_key")
            table = table.reset_index(drop=True)
        buf = table.to_parquet(index=False)
        assert buf is not None
        atomic_write_bytes(self.root / "samples.parquet", buf)
        return table

    # arrays ----------------------------------------------------------------------------------
    def array(self, name: str, tail: tuple[int, ...], dtype: str = "float16") -> np.memmap:
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

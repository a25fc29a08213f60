"""Rows of a ``.npy`` file on disk, read a selection at a time: the reduce stage's per-row arrays (maps on the
analysis grid, object grids) stay on disk, and memory holds only what an analysis reads at once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class DiskRows:
    """``[n, *tail]`` rows of a ``.npy`` file, read when indexed and let go after.

    A memory map would do the same reads, but every page it touches stays mapped, and counted in the process's
    memory, until the map is dropped: a pass over a million 32 x 32 float32 grids left 4 GB resident. Each read
    here maps the file, copies the selection out and unmaps it, so the resident memory is the selection.

    Args:
        path: an existing ``.npy`` file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mapped = np.load(self.path, mmap_mode="r")  # reads the header only
        self.shape: tuple[int, ...] = tuple(mapped.shape)
        self.dtype = mapped.dtype
        _unmap(mapped)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection: Any) -> np.ndarray:
        """A copy of ``rows[selection]`` (any numpy index: an int, a slice, indices, a bool mask, a tuple)."""
        mapped = np.load(self.path, mmap_mode="r")
        try:
            got = mapped[selection]  # a view of the map (a memmap) for a basic index, else already a copy
            return np.array(got) if isinstance(got, np.memmap) else np.asarray(got)
        finally:
            _unmap(mapped)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row (what ``np.asarray`` asks for): for small files and tests; the analyses read by chunk."""
        return self[:] if dtype is None else self[:].astype(dtype)


def write_rows(path: str | Path, n: int, tail: tuple[int, ...], dtype: str, chunks: Iterable[np.ndarray]) -> DiskRows:
    """A new ``[n, *tail]`` ``.npy`` file at ``path`` from ``chunks`` (consecutive row blocks, ``n`` rows in all),
    written with plain file writes (a memory map of the file would hold every page written until it is
    dropped), then read as :class:`DiskRows`."""
    header = np.lib.format.open_memmap(Path(path), mode="w+", dtype=dtype, shape=(n, *tail))  # header + size
    offset = header.offset
    _unmap(header)
    del header
    written = 0
    with open(path, "r+b") as f:
        f.seek(offset)
        for chunk in chunks:
            block = np.ascontiguousarray(chunk, dtype=dtype)
            if block.shape[1:] != tail:
                raise ValueError(f"{path}: a chunk has rows of shape {block.shape[1:]}, expected {tail}")
            f.write(block.tobytes())
            written += len(block)
    if written != n:
        raise ValueError(f"{path}: {written} rows were written, expected {n}")
    return DiskRows(path)


def _unmap(mapped: np.ndarray) -> None:
    """Unmap a memmap now, not when the garbage collector gets to it (a zero-size one has no map)."""
    handle = getattr(mapped, "_mmap", None)
    if handle is not None:
        handle.close()

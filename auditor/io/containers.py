"""Images stored inside container files: parquet, Arrow (a Hugging Face ``save_to_disk`` folder), WebDataset tar.

A sample in a container is ``(container path, member)``; the member is a short text that finds its bytes
without unpacking anything:

- parquet: ``rg=<row group>;row=<row in group>;col=<column>``: the row group's column is read (and kept for
  the next rows: a small per-process cache);
- Arrow stream (``data-*.arrow``): ``row=<row>;col=<column>``, from a memory-mapped table;
- tar: ``offset=<byte offset>;size=<bytes>``: one seek and one read.

The report and the run tables name such a sample ``<container>::<member>`` (:func:`locator`). No torch.
"""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path
from typing import Any

from auditor.io.images import ImageError, read_regular

SEP = "::"


def locator(path: Path | str, member: str) -> str:
    """The text that names a sample: its path, or ``<container>::<member>``."""
    return f"{path}{SEP}{member}" if member else str(path)


def read_locator(text: str) -> bytes:
    """The bytes :func:`locator` names."""
    path, _, member = text.partition(SEP)
    return read_member(Path(path), member)


def _fields(member: str) -> dict[str, str]:
    out = {}
    for part in member.split(";"):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def read_member(path: Path, member: str) -> bytes:
    """The bytes of one image: a whole file (``member`` empty) or one inside a container.

    Raises:
        ImageError: unreadable container or member, or a cell without image bytes.
    """
    if not member:
        return read_regular(path)
    fields = _fields(member)
    try:
        if "offset" in fields:
            with path.open("rb") as f:
                f.seek(int(fields["offset"]))
                data = f.read(int(fields["size"]))
            if len(data) != int(fields["size"]):
                raise ImageError(f"{path.name} ends before member {member} (truncated tar)")
            return data
        if "rg" in fields:
            column = _parquet_column(str(path), int(fields["rg"]), fields["col"])
            return cell_bytes(column[int(fields["row"])].as_py(), path, member)
        if "row" in fields:
            table = _arrow_table(str(path))
            return cell_bytes(table.column(fields["col"])[int(fields["row"])].as_py(), path, member)
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise ImageError(f"cannot read {member} of {path.name}: {err}") from None
    raise ImageError(f"unknown member {member!r} of {path.name}")


def cell_bytes(value: Any, path: Path, member: str) -> bytes:
    """Image bytes from a table cell: raw bytes, or a Hugging Face ``Image`` struct ``{bytes, path}``."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        raise ImageError(
            f"{path.name} {member}: the cell names a file ({value['path']}) instead of holding its bytes; save the "
            "dataset with embedded images (Hugging Face: dataset.cast_column(col, Image()) then save_to_disk / "
            "to_parquet with embed_external_files)"
        )
    raise ImageError(f"{path.name} {member}: the cell holds no image bytes ({type(value).__name__})")


@functools.lru_cache(maxsize=4)
def _parquet_column(path: str, row_group: int, column: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(column)


@functools.lru_cache(maxsize=4)
def _arrow_table(path: str) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar, from its headers alone.

    Raises:
        ImageError: not a readable tar.
    """
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed only: members must be seekable
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ImageError(f"cannot read tar shard {path}: {err} (WebDataset shards must be uncompressed .tar)") from None

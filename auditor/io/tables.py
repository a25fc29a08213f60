"""Sources whose images live inside containers: parquet files, Hugging Face ``save_to_disk`` folders, WebDataset
tar shards -> :class:`auditor.io.sources.Dataset`. Only the labels, masks' presence and metadata are read here;
the pixels are read later, one member at a time (:mod:`auditor.io.containers`). No torch.
"""

from __future__ import annotations

import bisect
import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.errors import DataError
from auditor.io.containers import tar_members
from auditor.io.images import ImageError
from auditor.io.sources import Dataset, SampleSpec, _check_unique_ids

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "npy")


@dataclass(frozen=True)
class Columns:
    """Which table columns hold the image, the label and (optionally) the mask."""

    image: str = "image"
    label: str = "label"
    mask: str | None = None


def _hf_label_names(meta: Any, label: str) -> list[str] | None:
    """``ClassLabel`` names of ``label`` in a Hugging Face ``features`` mapping, if any."""
    feature = (meta or {}).get(label) if isinstance(meta, dict) else None
    if isinstance(feature, dict) and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _schema_label_names(schema: Any, label: str) -> list[str] | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return _hf_label_names((info.get("info") or {}).get("features"), label)


def _scalar_columns(schema: Any, skip: set[str]) -> list[str]:
    import pyarrow as pa

    types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean,
             pa.types.is_floating)  # fmt: skip
    return [f.name for f in schema if f.name not in skip and any(t(f.type) for t in types)]


class _Labeller:
    """Label values -> class indices: names as given, or integers through ``classes`` / ``ClassLabel`` names."""

    def __init__(self, classes: list[str] | None, names: list[str] | None, source: str) -> None:
        self.given = classes
        self.names = names
        self.source = source
        self.seen: set[str] = set()

    def name(self, value: Any, origin: str) -> str:
        if value is None or value == "":
            raise DataError(f"{origin}: no label")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise DataError(f"{origin}: label {value!r} is neither a class name nor an integer")
        if isinstance(value, int):
            names = self.names or self.given
            if names is None:
                raise DataError(
                    f"{self.source}: integer labels need class names: set data.classes (in the model's output order), "
                    "or save the label column as a Hugging Face ClassLabel"
                )
            if not 0 <= value < len(names):
                raise DataError(f"{origin}: label {value} is outside the {len(names)} class names {names}")
            value = names[value]
        self.seen.add(str(value))
        return str(value)

    def classes(self) -> list[str]:
        if self.given is not None:
            return list(self.given)
        return list(self.names) if self.names else sorted(self.seen)


def _index(name: str, classes: list[str], origin: str) -> int:
    if name not in classes:
        raise DataError(f"{origin}: label {name!r} is not in the class list {classes}; add it to data.classes")
    return classes.index(name)


def _metadata_columns(available: list[str], metadata: list[str] | None, source: str) -> list[str]:
    if metadata is None:
        return available
    unknown = [c for c in metadata if c not in available]
    if unknown:
        raise DataError(f"data.metadata names column(s) {unknown} that {source} does not have (scalar: {available})")
    return list(metadata)


Row = tuple[Path, str, str, str, str | None, dict[str, str], str]  # container, member, label, id, mask, meta, origin


def _dataset(rows: list[Row], labeller: _Labeller, extra: list[str]) -> Dataset:
    """The sample specs of container rows, labels indexed once every label is known; ids checked unique."""
    classes = labeller.classes()
    samples = [
        SampleSpec(
            id=sid,
            path=path,
            member=member,
            label=_index(label, classes, origin),
            mask=path if mask_member else None,
            mask_member=mask_member or "",
            metadata={c: meta.get(c, "") for c in extra},
            origin=origin,
        )
        for path, member, label, sid, mask_member, meta, origin in rows
    ]
    _check_unique_ids(samples)
    return Dataset(samples, classes, extra)


def _table_dataset(
    files: list[tuple[Path, Any, str]],
    columns: Columns,
    classes: list[str] | None,
    metadata: list[str] | None,
    names: list[str] | None,
    source: str,
) -> Dataset:
    """Samples from tables: ``files`` holds ``(path, pyarrow table without the image column, kind)`` where kind
    is ``parquet`` (members by row group) or ``arrow``."""
    if not files:
        raise DataError(f"{source}: no data file")
    schema = files[0][1].schema
    for path, table, _ in files:
        for col in (columns.label,):
            if col not in table.schema.names:
                raise DataError(f"{path}: no column {col!r} (columns: {table.schema.names}); set data.label_column")
    mask_col = columns.mask
    if mask_col is None and "mask" in schema.names:
        mask_col = "mask"
    skip = {columns.image, columns.label, "id", *([mask_col] if mask_col else [])}
    extra = _metadata_columns(_scalar_columns(schema, skip), metadata, source)
    labeller = _Labeller(classes, names, source)
    rows: list[Row] = []
    for path, table, kind in files:
        data = table.to_pydict()
        n = table.num_rows
        groups = table.schema.metadata.get(b"auditor_row_groups") if table.schema.metadata else None
        sizes = json.loads(groups) if groups else [n]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for i in range(n):
            origin = f"{path.name} row {i}"
            if kind == "parquet":
                g = bisect.bisect_right(starts, i) - 1
                where = f"rg={g};row={i - starts[g]}"
            else:
                where = f"row={i}"
            label = labeller.name(data[columns.label][i], origin)
            has_mask = mask_col is not None and data.get(mask_col, [None] * n)[i] is not None
            sid = str(data["id"][i]) if "id" in data and data["id"][i] not in (None, "") else f"{path.name}#{i}"
            meta = {c: "" if data[c][i] is None else str(data[c][i]) for c in extra}
            rows.append(
                (path, f"{where};col={columns.image}", label, sid, f"{where};col={mask_col}" if has_mask else None,
                 meta, origin)
            )  # fmt: skip
    return _dataset(rows, labeller, extra)


def _parquet_files(spec: Path) -> list[Path]:
    if spec.is_dir():
        files = sorted(spec.rglob("*.parquet"))
        if not files:
            raise DataError(f"data.parquet: {spec} holds no .parquet file")
        return files
    return [spec]


def read_parquet(spec: Path, columns: Columns, classes: list[str] | None, metadata: list[str] | None) -> Dataset:
    """Parquet file(s) (a file, or a folder searched for ``*.parquet``) with an image column (bytes, or a Hugging
    Face ``{bytes, path}`` struct), a label column (class names, or integers with ``data.classes`` or Hugging
    Face ``ClassLabel`` names), an optional mask column and scalar metadata columns."""
    import pyarrow.parquet as pq

    files = []
    names: list[str] | None = None
    for path in _parquet_files(spec):
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read parquet file {path}: {err}") from err
        if columns.image not in pf.schema_arrow.names:
            raise DataError(
                f"{path}: no image column {columns.image!r} (columns: {pf.schema_arrow.names}); set data.image_column"
            )
        keep = [c for c in pf.schema_arrow.names if c != columns.image]
        table = pf.read(columns=keep)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        meta = dict(table.schema.metadata or {})
        meta[b"auditor_row_groups"] = json.dumps(sizes).encode()
        table = table.replace_schema_metadata(meta)
        names = names or _schema_label_names(pf.schema_arrow, columns.label)
        files.append((path, table, "parquet"))
    return _table_dataset(files, columns, classes, metadata, names, f"data.parquet {spec}")


def read_huggingface_disk(
    folder: Path, split: str | None, columns: Columns, classes: list[str] | None, metadata: list[str] | None
) -> Dataset:
    """A folder written by Hugging Face ``Dataset.save_to_disk`` (``state.json``, ``dataset_info.json``,
    ``data-*.arrow``), or a ``DatasetDict`` folder with ``split`` naming the split."""
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split is None or split not in splits:
            raise DataError(f"data.huggingface: {folder} holds the splits {splits}; choose one with data.split")
        folder = folder / split
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise DataError(f"data.huggingface: {folder} has no state.json; give the folder that save_to_disk wrote")
    state = json.loads(state_file.read_text())
    info_file = folder / "dataset_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    names = _hf_label_names(info.get("features"), columns.label)
    files = []
    for entry in state.get("_data_files", []):
        path = folder / entry["filename"]
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"cannot read Arrow file {path}: {err}") from err
        if columns.image not in table.schema.names:
            raise DataError(
                f"{path}: no image column {columns.image!r} (columns: {table.schema.names}); set data.image_column"
            )
        files.append((path, table.drop_columns([columns.image]), "arrow"))
    return _table_dataset(files, columns, classes, metadata, names, f"data.huggingface {folder}")


def expand_shards(patterns: Sequence[str]) -> list[Path]:
    """Shard paths from patterns with brace ranges (``train-{000..009}.tar``) and globs, in order."""
    out: list[Path] = []
    for pattern in patterns:
        expanded = [pattern]
        while any("{" in p for p in expanded):
            nxt = []
            for p in expanded:
                m = re.search(r"\{(\d+)\.\.(\d+)\}", p)
                if m is None:
                    raise DataError(f"data.webdataset: cannot expand {pattern!r} (braces take {{000..009}} ranges)")
                lo, hi = m.group(1), m.group(2)
                width = len(lo) if lo.startswith("0") else 0
                nxt += [p[: m.start()] + str(k).zfill(width) + p[m.end() :] for k in range(int(lo), int(hi) + 1)]
            expanded = nxt
        for p in expanded:
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not matches:
                raise DataError(f"data.webdataset: no shard matches {p!r}")
            out += [Path(m) for m in matches]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise DataError(f"data.webdataset: shard(s) not found: {missing[:5]}")
    return out


def _small(path: Path, offset: int, size: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size).decode("utf-8", errors="replace").strip()


def _webdataset_row(shard: Path, key: str, parts: dict[str, tuple[int, int]], labeller: _Labeller) -> Row:
    """``(shard, image member, label name, key, mask member, metadata, origin)`` of one WebDataset sample."""
    origin = f"{shard.name} {key}"
    image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if image_ext is None:
        raise DataError(f"{origin}: no image member ({', '.join('.' + e for e in IMAGE_EXTS)}); has {sorted(parts)}")
    info: dict[str, Any] = {}
    if "json" in parts:
        try:
            info = json.loads(_small(shard, *parts["json"]))
        except ValueError as err:
            raise DataError(f"{origin}: {key}.json is not JSON: {err}") from None
    if "cls" in parts:
        text = _small(shard, *parts["cls"])
        if not re.fullmatch(r"-?\d+", text):
            raise DataError(f"{origin}: {key}.cls holds {text!r}, not an integer class index")
        value: Any = int(text)
    elif "txt" in parts or "label" in parts:
        value = _small(shard, *parts["txt" if "txt" in parts else "label"])
    else:
        value = info.get("label")
    label = labeller.name(value, origin)
    meta = {k: str(v) for k, v in info.items() if k != "label" and isinstance(v, str | int | float | bool)}
    image = "offset={};size={}".format(*parts[image_ext])
    mask = "offset={};size={}".format(*parts["mask.png"]) if "mask.png" in parts else ""
    return shard, image, label, key, mask, meta, origin


def read_webdataset(shards: Sequence[Path], classes: list[str] | None, metadata: list[str] | None) -> Dataset:
    """WebDataset tar shards: members grouped by key (the name up to the first dot of its file name); the image
    is ``<key>.jpg|png|...``, the label ``<key>.cls`` (an integer, with ``data.classes``) or ``<key>.txt`` /
    ``<key>.label`` (a class name) or ``<key>.json``'s ``label``, the mask ``<key>.mask.png``; the other scalar
    ``json`` keys are metadata. Only the tar headers and the small members are read here."""
    labeller = _Labeller(classes, None, "data.webdataset")
    rows: list[Row] = []
    keys_meta: set[str] = set()
    for shard in shards:
        try:
            members = tar_members(shard)
        except ImageError as err:
            raise DataError(str(err)) from None
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            folder, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            groups.setdefault(key, {})[ext.lower()] = (offset, size)
        for key, parts in groups.items():
            row = _webdataset_row(shard, key, parts, labeller)
            keys_meta.update(row[5])
            rows.append(row)
    if not rows:
        raise DataError(f"data.webdataset: the shards {[str(s) for s in shards[:3]]} hold no sample")
    extra = _metadata_columns(sorted(keys_meta), metadata, "data.webdataset")
    return _dataset(rows, labeller, extra)

"""Sample sources: CSV manifest, image folder (+ mirrored mask folder) or COCO JSON -> :class:`Dataset`.

Light, picklable sample specs; pixels are read later by :class:`auditor.io.dataset.AuditDataset`. Also
the seeded selections (``--per-class``, ``--limit``, the stratified expensive subset). No torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditor.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".npy")
_BOX_COLS = ("x0", "y0", "x1", "y1")
_RESERVED = {"path", "label", "mask", "id", "boxes", *_BOX_COLS}
Box = tuple[float, float, float, float]


@dataclass
class SampleSpec:
    """One image to audit (light and picklable; pixels are read by the DataLoader workers)."""

    id: str
    path: Path
    label: int
    mask: Path | None = None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    polygons: list[list[float]] = field(default_factory=list)  # COCO polygons, original pixels
    rle: list[dict[str, Any]] = field(default_factory=list)  # COCO RLE
    metadata: dict[str, str] = field(default_factory=dict)
    origin: str = ""  # where it was declared, for error messages ("audit.csv line 12")
    member: str = ""  # inside a container file (parquet, Arrow, tar): see auditor.io.containers
    mask_member: str = ""


@dataclass
class Dataset:
    """The sample list with its class order and metadata columns."""

    samples: list[SampleSpec]
    classes: list[str]
    metadata: list[str]


# ------------------------------------------------------------------------------------------ sources


def _class_index(label: str, classes: list[str], origin: str) -> int:
    if label not in classes:
        raise DataError(
            f"{origin}: label {label!r} is not in the class list {classes}; add it to data.classes or fix the label"
        )
    return classes.index(label)


def _float(value: str, origin: str, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{origin}: column {column!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{origin}: column {column!r} must be a finite number, got {value!r}")
    return number


def _row_boxes(row: dict[str, Any], box_cols: bool, boxes_col: bool, origin: str) -> list[Box]:
    """The boxes of one manifest row: ``x0, y0, x1, y1`` columns and/or a JSON ``boxes`` list."""
    boxes: list[Box] = []
    if box_cols and any(str(row[c]).strip() for c in _BOX_COLS):
        x0, y0, x1, y1 = (_float(str(row[c]), origin, c) for c in _BOX_COLS)
        boxes.append((x0, y0, x1, y1))
    if boxes_col and str(row["boxes"]).strip():
        try:
            parsed = json.loads(row["boxes"])
            boxes += [tuple(_float(str(v), origin, "boxes") for v in b) for b in parsed]  # type: ignore[misc]
        except (ValueError, TypeError) as err:
            raise DataError(f"{origin}: column 'boxes' must be a JSON list of [x0, y0, x1, y1]: {err}") from None
        if any(len(b) != 4 for b in boxes):
            raise DataError(f"{origin}: every box needs 4 numbers x0, y0, x1, y1")
    return boxes


def read_manifest(path: Path, root: Path | None, classes: list[str] | None, metadata: list[str] | None) -> Dataset:
    """Read a CSV manifest: ``path, label[, mask][, x0, y0, x1, y1 | boxes][, id][, metadata...]``.

    Several rows may name the same image (one box per row); ``boxes`` may hold a JSON list of
    ``[x0, y0, x1, y1]``. Paths are relative to ``root`` (default: the manifest's folder).
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read manifest {path}: {err}") from err
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(f"manifest {path} lacks column(s) {missing}; it has {list(df.columns)}")
    present_box = [c for c in _BOX_COLS if c in df.columns]
    if present_box and len(present_box) != 4:
        raise DataError(f"manifest {path}: box columns need all of x0, y0, x1, y1 (found {present_box})")
    extra = [c for c in df.columns if c not in _RESERVED]
    if metadata is not None:
        unknown = [c for c in metadata if c not in df.columns]
        if unknown:
            raise DataError(f"data.metadata names column(s) {unknown} that manifest {path} does not have")
        extra = list(metadata)
    base = root or path.parent
    if classes is None:
        classes = sorted({str(v) for v in df["label"] if str(v) != ""})
    by_path: dict[str, SampleSpec] = {}
    for i, row in enumerate(df.to_dict("records")):
        origin = f"{path.name} line {i + 2}"
        rel = str(row["path"]).strip()
        if not rel:
            raise DataError(f"{origin}: empty path")
        label = _class_index(str(row["label"]).strip(), classes, origin)
        boxes = _row_boxes(row, bool(present_box), "boxes" in df.columns, origin)
        mask = str(row.get("mask", "")).strip()
        meta = {c: str(row[c]) for c in extra}
        sid = str(row.get("id", "")).strip() or rel
        if rel in by_path:
            prev = by_path[rel]
            if prev.label != label or prev.metadata != meta:
                raise DataError(f"{origin}: {rel!r} appears again ({prev.origin}) with a different label or metadata")
            prev.boxes += boxes
            continue
        by_path[rel] = SampleSpec(
            id=sid,
            path=base / rel,
            label=label,
            mask=(base / mask) if mask else None,
            boxes=boxes,
            metadata=meta,
            origin=origin,
        )
    samples = list(by_path.values())
    _check_unique_ids(samples)
    return Dataset(samples, classes, extra)


def read_image_folder(folder: Path, mask_folder: Path | None, classes: list[str] | None) -> Dataset:
    """``folder/<class>/<image>``; masks at ``mask_folder/<class>/<image stem>.png`` when given."""
    dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not dirs:
        raise DataError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    if classes is None:
        classes = dirs
    else:
        unknown = [d for d in dirs if d not in classes]
        if unknown:
            raise DataError(f"image folder {folder} has class folder(s) {unknown} not in data.classes {classes}")
    samples = []
    for d in dirs:
        for img in sorted((folder / d).rglob("*")):
            if img.suffix.lower() not in IMAGE_EXTENSIONS or not img.is_file():
                continue
            rel = img.relative_to(folder)
            mask = None
            if mask_folder is not None:
                candidate = (mask_folder / rel).with_suffix(".png")
                mask = candidate if candidate.is_file() else None
            samples.append(SampleSpec(rel.as_posix(), img, classes.index(d), mask, origin=str(rel)))
    if not samples:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Dataset(samples, classes, [])


def read_coco(path: Path, root: Path | None, classes: list[str] | None) -> Dataset:
    """COCO-style JSON: category names are labels; boxes ``[x, y, w, h]``; polygons or RLE become masks.

    An image's label is the category of its largest annotation (by area); its boxes and mask are those
    of the annotations of that category. Images without annotations are skipped with a warning.
    """
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
        images = {im["id"]: im for im in coco["images"]}
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read COCO file {path}: {err}") from err
    if classes is None:
        classes = sorted(set(cats.values()))
    base = root or path.parent
    per_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in annotations:
        per_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for image_id, im in images.items():
        anns = per_image.get(image_id, [])
        origin = f"{path.name} image id {image_id}"
        if not anns:
            log.warning("%s (%s) has no annotation: skipped", origin, im.get("file_name"))
            continue
        main = max(anns, key=lambda a: float(a.get("area") or a["bbox"][2] * a["bbox"][3]))
        label_name = cats.get(main["category_id"])
        if label_name is None:
            raise DataError(f"{origin}: category id {main['category_id']} is not in 'categories'")
        chosen = [a for a in anns if a["category_id"] == main["category_id"]]
        spec = SampleSpec(
            id=str(im["file_name"]),
            path=base / im["file_name"],
            label=_class_index(label_name, classes, origin),
            origin=origin,
        )
        for a in chosen:
            x, y, w, h = (_float(str(v), origin, "bbox") for v in a["bbox"])
            spec.boxes.append((x, y, x + w, y + h))
            seg = a.get("segmentation")
            if isinstance(seg, list):
                spec.polygons += [list(map(float, p)) for p in seg if len(p) >= 6]
            elif isinstance(seg, dict):
                spec.rle.append(seg)
        samples.append(spec)
    _check_unique_ids(samples)
    return Dataset(samples, classes, [])


def _check_unique_ids(samples: Sequence[SampleSpec]) -> None:
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"{s.origin}: sample id {s.id!r} is used twice (also {seen[s.id]}); ids must be unique")
        seen[s.id] = s.origin


def select(
    samples: list[SampleSpec],
    classes: list[str],
    *,
    only_classes: Sequence[str] | None,
    per_class: int | None,
    limit: int | None,
    seed: int,
) -> list[SampleSpec]:
    """Deterministic subset: class filter, then ``per_class`` per class, then ``limit`` (seeded choices).

    The result interleaves the classes round-robin (each class sorted by sample id), so the batches (and a
    resumed run) are the same every time whatever the manifest's order.
    """
    chosen = sorted(samples, key=lambda s: s.id)
    if only_classes:
        unknown = [c for c in only_classes if c not in classes]
        if unknown:
            raise DataError(f"--only-classes names unknown class(es) {unknown}; classes are {classes}")
        keep = {classes.index(c) for c in only_classes}
        chosen = [s for s in chosen if s.label in keep]
    rng = np.random.default_rng(seed)
    if per_class is not None:
        picked: list[SampleSpec] = []
        for c in range(len(classes)):
            members = [s for s in chosen if s.label == c]
            if len(members) > per_class:
                idx = sorted(rng.choice(len(members), per_class, replace=False).tolist())
                members = [members[i] for i in idx]
            picked += members
        chosen = sorted(picked, key=lambda s: s.id)
    if limit is not None and len(chosen) > limit:
        idx = sorted(rng.choice(len(chosen), limit, replace=False).tolist())
        chosen = [chosen[i] for i in idx]
    return interleave(chosen)


def interleave(samples: list[SampleSpec]) -> list[SampleSpec]:
    """Round-robin over classes (in class order), each class in sample-id order."""
    by_class: dict[int, list[SampleSpec]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        by_class.setdefault(s.label, []).append(s)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[SampleSpec] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def sample_key(sample_id: str, seed: int, salt: str) -> int:
    """A 64-bit number keyed by sample id, seed and purpose: a draw that no batch, order or shard can move."""
    return int(hashlib.sha1(f"{salt}\0{seed}\0{sample_id}".encode()).hexdigest()[:16], 16)


def keyed_order(ids: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """Positions of ``ids`` in the order of their keys (:func:`sample_key`): the first ``k`` of it are a draw of
    ``k`` samples in which a sample is chosen or not by its own key alone, so adding or removing another
    sample, reordering or sharding the list moves no other sample's draw (it can only take one place)."""
    keys = [sample_key(str(i), seed, salt) for i in ids]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def background_partners(samples: Sequence[SampleSpec], probe: np.ndarray, seed: int) -> np.ndarray:
    """For every probed sample with an annotation, another probed, annotated sample of another class.

    The swapped-background counterfactual pastes a sample's object on its partner's background. The
    choice is keyed by the sample's id and the seed (a hash picks among the candidates sorted by id), so
    it is the same whatever the batch size, order or sharding.

    Args:
        samples: the run's samples.
        probe: ``[n]`` bool, the samples that get the counterfactual forwards.
        seed: the run's seed.

    Returns:
        ``[n]`` int64: the partner's row, or -1 (not probed, no annotation, or no other class to pair with).
    """
    annotated = [int(i) for i in np.flatnonzero(probe) if _annotated(samples[int(i)])]
    candidates = sorted(annotated, key=lambda i: samples[i].id)
    labels = np.array([samples[i].label for i in candidates])
    out = np.full(len(samples), -1, dtype=np.int64)
    for i in annotated:
        others = np.flatnonzero(labels != samples[i].label)
        if len(others):
            out[i] = candidates[others[sample_key(samples[i].id, seed, "partner") % len(others)]]
    return out


def _annotated(s: SampleSpec) -> bool:
    return s.mask is not None or bool(s.boxes) or bool(s.polygons) or bool(s.rle)


def stratified_subset(
    ids: Sequence[str],
    labels: Sequence[int],
    per_class: int,
    seed: int,
    salt: str = "stratified",
    total: int | None = None,
) -> np.ndarray:
    """Bool mask over samples: up to ``per_class`` picks from every class, keyed by sample id (:func:`keyed_order`),
    and at most ``total`` in all.

    Under a ``total``, the picks are taken round by round (every class's first pick, then every class's second,
    ...), the classes of a round in an order keyed by class and seed, until ``total``: every class gets
    ``total // classes`` picks or one more (or all it has), so an audit of 1,000 classes costs what the budget
    says, not 1,000 x ``per_class``.
    """
    labels_arr = np.asarray(labels)
    if len(ids) != len(labels_arr):
        raise ValueError(f"{len(ids)} sample ids for {len(labels_arr)} labels")
    classes = np.unique(labels_arr)
    class_rank = np.argsort(keyed_order([str(c) for c in classes], seed, f"{salt}-classes"))
    picks: list[tuple[int, int, int]] = []  # (round, the class's keyed rank, sample position)
    for k, c in enumerate(classes):
        members = np.flatnonzero(labels_arr == c)
        order = keyed_order([ids[int(i)] for i in members], seed, salt)
        picks += [(r, int(class_rank[k]), int(members[i])) for r, i in enumerate(order[:per_class])]
    if total is not None:
        picks = sorted(picks)[:total]
    keep = np.zeros(len(labels_arr), dtype=bool)
    keep[[p for _, _, p in picks]] = True
    return keep


def confine(samples: Sequence[SampleSpec], roots: Sequence[Path]) -> None:
    """Refuse image or mask paths that resolve (``..``, absolute paths, symbolic links) outside ``roots``.

    A shared report embeds the audited images: a manifest must not be able to pull in any file of the
    machine. Raises :class:`DataError` naming up to five offending rows.
    """
    resolved = [Path(r).resolve() for r in roots]
    bad = []
    for s in samples:
        for kind, path in (("image", s.path), ("mask", s.mask)):
            if path is not None and not any(Path(path).resolve().is_relative_to(r) for r in resolved):
                bad.append(f"{s.origin}: {kind} {path} resolves outside {', '.join(map(str, resolved))}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(
            "paths outside the data root are refused:\n  "
            + "\n  ".join(bad[:5])
            + more
            + "\nmove the files under the root, set data.root, or set data.allow_outside_root: true"
        )

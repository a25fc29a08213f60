"""Datasets: CSV manifest, image folder (+ mirrored mask folder) or COCO JSON -> samples -> batches.

Images of any mode (RGB, grayscale, RGBA, palette, 16-bit) and size are resized (no crop) to
``image_size x image_size``; masks go through the same resize with nearest interpolation and boxes are
scaled by the same factors. A sample that cannot be used (missing, corrupt or truncated image) is
skipped with its reason; a problem that only affects its annotations (mask of the wrong size, empty
mask, box outside the image) drops or clips that annotation with a warning. Both are counted in
``summary.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from auditor.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_BOX_COLS = ("x0", "y0", "x1", "y1")
_RESERVED = {"path", "label", "mask", "id", "boxes", *_BOX_COLS}


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
        return float(value)
    except ValueError:
        raise DataError(f"{origin}: column {column!r} must be a number, got {value!r}") from None


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
        boxes: list[tuple[float, float, float, float]] = []
        if present_box and any(str(row[c]).strip() for c in _BOX_COLS):
            x0, y0, x1, y1 = (_float(str(row[c]), origin, c) for c in _BOX_COLS)
            boxes.append((x0, y0, x1, y1))
        if "boxes" in df.columns and str(row["boxes"]).strip():
            try:
                parsed = json.loads(row["boxes"])
                boxes += [tuple(float(v) for v in b) for b in parsed]  # type: ignore[misc]
            except (ValueError, TypeError) as err:
                raise DataError(f"{origin}: column 'boxes' must be a JSON list of [x0, y0, x1, y1]: {err}") from None
            if any(len(b) != 4 for b in boxes):
                raise DataError(f"{origin}: every box needs 4 numbers x0, y0, x1, y1")
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
            x, y, w, h = (float(v) for v in a["bbox"])
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


# ------------------------------------------------------------------------------------------ pixels


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> ``[H, W, 3]`` float32 in [0, 1]. Grayscale is repeated, alpha dropped, 16-bit rescaled.

    Raises ``OSError`` / ``UnidentifiedImageError`` / ``ValueError`` for unreadable or truncated files.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes fully: a truncated file fails here
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(arr / top, 0, 1)
            return np.repeat(arr[:, :, None], 3, axis=2)
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0


def decode_mask(data: bytes) -> np.ndarray:
    """Bytes -> ``[H, W]`` bool (nonzero in any channel = object)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im)
    return np.asarray(arr.any(axis=2) if arr.ndim == 3 else arr != 0, dtype=bool)


def rle_counts(counts: str | list[int]) -> list[int]:
    """COCO RLE counts (compressed string as in pycocotools' ``rleFrString``, or a plain list)."""
    if isinstance(counts, list):
        return [int(c) for c in counts]
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE -> ``[H, W]`` bool (column-major runs, starting with background)."""
    h, w = (int(v) for v in rle["size"])
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in rle_counts(rle["counts"]):
        if value:
            flat[pos : pos + run] = True
        pos += run
        value = not value
    return flat.reshape(w, h).T


def _polygon_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros((h, w), dtype=bool)
    for poly in polygons:
        xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
        rr, cc = draw_polygon(ys, xs, shape=(h, w))
        mask[rr, cc] = True
    return mask


class AuditDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Map-style dataset over sample specs; each item is a dict (see :meth:`__getitem__`)."""

    def __init__(
        self, samples: Sequence[SampleSpec], image_size: int, mean_std: tuple[list[float], list[float]] | None
    ) -> None:
        self.samples = list(samples)
        self.size = image_size
        self.mean = torch.tensor(mean_std[0]).view(3, 1, 1) if mean_std else None
        self.std = torch.tensor(mean_std[1]).view(3, 1, 1) if mean_std else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one sample.

        Returns a dict with ``index``, ``ok`` and, when ok: ``image [3, S, S]`` (normalized), ``mask
        [S, S]`` bool, ``has_mask``, ``mask_source`` (mask | boxes | polygons | none), ``boxes [n, 4]`` in
        resized pixels, ``scale`` (resized px per original px), ``sha1``, ``orig_size``, ``warnings``;
        when not ok: ``reason``.
        """
        spec = self.samples[index]
        try:
            data = spec.path.read_bytes()
        except OSError as err:
            return {"index": index, "ok": False, "reason": f"cannot read image: {err.strerror or err}"}
        try:
            pixels = decode_image(data)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            return {"index": index, "ok": False, "reason": f"corrupt or truncated image: {err}"}
        h, w = pixels.shape[:2]
        s = self.size
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        image = image.clamp(0, 1)
        if self.mean is not None and self.std is not None:
            image = (image - self.mean) / self.std
        warnings: list[str] = []
        full_mask, source = self._full_mask(spec, h, w, warnings)
        sx, sy = s / w, s / h
        boxes = []
        for x0, y0, x1, y1 in spec.boxes:
            cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            if cx1 <= cx0 or cy1 <= cy0:
                warnings.append(f"box {[x0, y0, x1, y1]} lies outside the {w}x{h} image: dropped")
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                warnings.append(f"box {[x0, y0, x1, y1]} extends past the {w}x{h} image: clipped")
            boxes.append((cx0 * sx, cy0 * sy, cx1 * sx, cy1 * sy))
        box_t = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
        if full_mask is not None:
            mask_t = torch.from_numpy(full_mask)[None, None].float()
            mask = F.interpolate(mask_t, size=(s, s), mode="nearest")[0, 0] > 0.5
        elif len(boxes):
            mask = torch.zeros(s, s, dtype=torch.bool)
            for x0, y0, x1, y1 in boxes:  # pixel (i, j) is inside when its centre is
                r0, r1 = round(y0), max(round(y1), round(y0) + 1)
                c0, c1 = round(x0), max(round(x1), round(x0) + 1)
                mask[r0:r1, c0:c1] = True
            source = "boxes"
        else:
            mask = torch.zeros(s, s, dtype=torch.bool)
        has_mask = source != "none"
        if has_mask and not bool(mask.any()):
            warnings.append("empty mask (no object pixel after resizing): localization metrics are NaN")
        return {
            "index": index,
            "ok": True,
            "image": image.float(),
            "mask": mask,
            "has_mask": has_mask,
            "mask_source": source,
            "boxes": box_t,
            "scale": float(np.sqrt(sx * sy)),
            "sha1": hashlib.sha1(data).hexdigest(),
            "orig_size": (h, w),
            "warnings": warnings,
        }

    @staticmethod
    def _full_mask(spec: SampleSpec, h: int, w: int, warnings: list[str]) -> tuple[np.ndarray | None, str]:
        """The object mask at the original size and its source, or (None, "none")."""
        if spec.mask is not None:
            try:
                mask = decode_mask(spec.mask.read_bytes())
            except OSError as err:
                warnings.append(f"mask {spec.mask} unreadable ({err}): no mask used")
                return None, "none"
            except (UnidentifiedImageError, ValueError, SyntaxError) as err:
                warnings.append(f"mask {spec.mask} is corrupt ({err}): no mask used")
                return None, "none"
            if mask.shape != (h, w):
                warnings.append(
                    f"mask {spec.mask.name} has size {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}: "
                    "no mask used"
                )
                return None, "none"
            return mask, "mask"
        if spec.polygons or spec.rle:
            mask = _polygon_mask(spec.polygons, h, w)
            for rle in spec.rle:
                decoded = rle_decode(rle)
                if decoded.shape == (h, w):
                    mask |= decoded
                else:
                    warnings.append(f"RLE mask size {decoded.shape} differs from the image {h}x{w}: ignored")
            return mask, "polygons"
        return None, "none"


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable samples of a batch; keep the skipped ones as ``(index, reason)``."""
    good = [it for it in items if it["ok"]]
    batch: dict[str, Any] = {
        "skipped": [(it["index"], it["reason"]) for it in items if not it["ok"]],
        "warnings": [(it["index"], w) for it in good for w in it["warnings"]],
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
    }
    if good:
        batch["image"] = torch.stack([it["image"] for it in good])
        batch["mask"] = torch.stack([it["mask"] for it in good])
        batch["has_mask"] = torch.tensor([it["has_mask"] for it in good])
        batch["boxes"] = [it["boxes"] for it in good]
        batch["scale"] = torch.tensor([it["scale"] for it in good], dtype=torch.float32)
        batch["sha1"] = [it["sha1"] for it in good]
        batch["mask_source"] = [it["mask_source"] for it in good]
    return batch


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
    resumed run) are the same every time and every batch mixes classes (the background-swap
    counterfactual pairs images of different classes within a batch).
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


def stratified_subset(labels: Sequence[int], per_class: int, seed: int) -> np.ndarray:
    """Bool mask over samples: up to ``per_class`` seeded picks from every class."""
    labels_arr = np.asarray(labels)
    keep = np.zeros(len(labels_arr), dtype=bool)
    rng = np.random.default_rng(seed + 1)
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        pick = members if len(members) <= per_class else rng.choice(members, per_class, replace=False)
        keep[pick] = True
    return keep


def load_dataset(cfg: Any) -> Dataset:
    """Read the configured source (``cfg`` is a :class:`auditor.config.DataConfig`)."""
    if cfg.manifest is not None:
        return read_manifest(cfg.manifest, cfg.root, cfg.classes, cfg.metadata)
    if cfg.image_folder is not None:
        return read_image_folder(cfg.image_folder, cfg.mask_folder, cfg.classes)
    return read_coco(cfg.coco, cfg.root, cfg.classes)

"""The torch dataset over sample specs, and the batch collation (skipped samples travel with the batch).

Images of any mode (RGB, grayscale, RGBA, palette, 16-bit) and size are resized (no crop) to
``image_size x image_size``; masks go through the same resize with nearest interpolation and boxes are
scaled by the same factors. A sample that cannot be used (missing, corrupt or truncated image) is
skipped with its reason; a problem that only affects its annotations (mask of the wrong size, empty
mask, box outside the image) drops or clips that annotation with a warning. Both are counted in
``summary.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from auditor.io.containers import read_member
from auditor.io.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_for,
    decode_mask,
    polygon_mask,
    rle_decode,
)
from auditor.io.sources import SampleSpec


class AuditDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Map-style dataset over sample specs; each item is a dict (see :meth:`__getitem__`)."""

    def __init__(
        self,
        samples: Sequence[SampleSpec],
        image_size: int,
        mean_std: tuple[list[float], list[float]] | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.size = image_size
        self.max_pixels = max_pixels
        self.mean = torch.tensor(mean_std[0]).view(3, 1, 1) if mean_std else None
        self.std = torch.tensor(mean_std[1]).view(3, 1, 1) if mean_std else None
        self.partners: np.ndarray | None = None  # [n] row of each sample's background partner, or -1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one sample and, where :attr:`partners` names one, its background partner's image and mask."""
        item = self.load(index)
        partner = -1 if self.partners is None else int(self.partners[index])
        if item["ok"] and partner >= 0:
            other = self.load(partner)
            if other["ok"] and other["has_mask"] and bool(other["mask"].any()):
                item["partner"] = (partner, other["image"], other["mask"], self.samples[partner].label)
        return item

    def load(self, index: int) -> dict[str, Any]:
        """Load one sample.

        Returns a dict with ``index``, ``ok`` and, when ok: ``image [3, S, S]`` (normalized), ``mask
        [S, S]`` bool, ``has_mask``, ``mask_source`` (mask | boxes | polygons | none), ``boxes [n, 4]`` in
        resized pixels, ``scale`` (resized px per original px), ``sha1``, ``orig_size``, ``warnings``;
        when not ok: ``reason``.
        """
        spec = self.samples[index]
        try:
            data = read_member(spec.path, spec.member)
            pixels, (h, w) = decode_for(data, self.max_pixels, self.size)
        except ImageError as err:
            return {"index": index, "ok": False, "reason": str(err)}
        s = self.size
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        image = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        image = image.clamp(0, 1)
        if self.mean is not None and self.std is not None:
            image = (image - self.mean) / self.std
        warnings: list[str] = []
        full_mask, source = self._full_mask(spec, h, w, warnings, self.max_pixels)
        sx, sy = s / w, s / h
        boxes = _resized_boxes(spec.boxes, h, w, sx, sy, warnings)
        if full_mask is not None:
            mask_t = torch.from_numpy(full_mask)[None, None].float()
            mask = F.interpolate(mask_t, size=(s, s), mode="nearest")[0, 0] > 0.5
        else:
            mask = _box_mask(boxes, s)
            source = "boxes" if boxes else source
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
            "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            "scale": float(np.sqrt(sx * sy)),
            "sha1": hashlib.sha1(data).hexdigest(),
            "orig_size": (h, w),
            "warnings": warnings,
        }

    @staticmethod
    def _full_mask(
        spec: SampleSpec, h: int, w: int, warnings: list[str], max_pixels: int
    ) -> tuple[np.ndarray | None, str]:
        """The object mask at the original size and its source, or (None, "none")."""
        if spec.mask is not None:
            try:
                mask, distinct = decode_mask(read_member(spec.mask, spec.mask_member), max_pixels)
            except ImageError as err:
                warnings.append(f"mask {spec.mask.name} unusable ({err}): no mask used")
                return None, "none"
            if distinct > 2:
                warnings.append(
                    f"mask {spec.mask.name} has {distinct} distinct values, not 2: read as nonzero = object "
                    "(save masks as 0 = background, nonzero = object)"
                )
            if mask.all():
                warnings.append(f"mask {spec.mask.name} covers the whole image: the object has no background")
            if mask.shape != (h, w):
                warnings.append(
                    f"mask {spec.mask.name} has size {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}: "
                    "no mask used"
                )
                return None, "none"
            return mask, "mask"
        if spec.polygons or spec.rle:
            mask = polygon_mask(spec.polygons, h, w)
            for rle in spec.rle:
                decoded = rle_decode(rle)
                if decoded.shape == (h, w):
                    mask |= decoded
                else:
                    warnings.append(f"RLE mask size {decoded.shape} differs from the image {h}x{w}: ignored")
            return mask, "polygons"
        return None, "none"


def _resized_boxes(
    boxes: Sequence[tuple[float, float, float, float]], h: int, w: int, sx: float, sy: float, warnings: list[str]
) -> list[tuple[float, float, float, float]]:
    """Boxes clipped to the ``w x h`` image (dropped when outside, with a warning) and scaled by ``(sx, sy)``."""
    out = []
    for x0, y0, x1, y1 in boxes:
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        if cx1 <= cx0 or cy1 <= cy0:
            warnings.append(f"box {[x0, y0, x1, y1]} lies outside the {w}x{h} image: dropped")
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            warnings.append(f"box {[x0, y0, x1, y1]} extends past the {w}x{h} image: clipped")
        out.append((cx0 * sx, cy0 * sy, cx1 * sx, cy1 * sy))
    return out


def _box_mask(boxes: Sequence[tuple[float, float, float, float]], s: int) -> torch.Tensor:
    """``[s, s]`` bool union of the boxes; pixel (i, j) is inside when its centre is."""
    mask = torch.zeros(s, s, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        r0, r1 = round(y0), max(round(y1), round(y0) + 1)
        c0, c1 = round(x0), max(round(x1), round(x0) + 1)
        mask[r0:r1, c0:c1] = True
    return mask


def drop(batch: dict[str, Any], positions: Sequence[int], reason: str) -> dict[str, Any]:
    """The collated ``batch`` without the samples at ``positions``, which join its skipped list with ``reason``."""
    gone = set(positions)
    keep = [i for i in range(int(batch["index"].numel())) if i not in gone]
    rows = batch["index"].tolist()
    dropped = {rows[i] for i in gone}
    out: dict[str, Any] = {
        "skipped": [*batch["skipped"], *((rows[i], reason) for i in sorted(gone))],
        "warnings": [(r, w) for r, w in batch["warnings"] if r not in dropped],
        "index": batch["index"][keep],
    }
    if keep:
        pick = torch.tensor(keep, dtype=torch.long)
        for key in (
            "image",
            "mask",
            "has_mask",
            "scale",
            "has_partner",
            "partner_image",
            "partner_mask",
            "partner_label",
        ):
            if key in batch:
                out[key] = batch[key][pick.to(batch[key].device)]
        for key in ("boxes", "sha1", "mask_source"):
            out[key] = [batch[key][i] for i in keep]
    return out


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
        batch["has_partner"] = torch.tensor(["partner" in it for it in good])
        if bool(batch["has_partner"].any()):  # the background partners' images (zeros where none)
            ref = next(it["partner"] for it in good if "partner" in it)
            blank = (-1, torch.zeros_like(ref[1]), torch.zeros_like(ref[2]), -1)
            parts = [it.get("partner", blank) for it in good]
            batch["partner_image"] = torch.stack([p[1] for p in parts])
            batch["partner_mask"] = torch.stack([p[2] for p in parts])
            batch["partner_label"] = torch.tensor([p[3] for p in parts], dtype=torch.long)
    return batch

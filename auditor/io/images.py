"""Decoding pixels: images of any mode, masks, COCO RLE and polygons (numpy + PIL, no torch)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


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


def polygon_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros((h, w), dtype=bool)
    for poly in polygons:
        xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
        rr, cc = draw_polygon(ys, xs, shape=(h, w))
        mask[rr, cc] = True
    return mask

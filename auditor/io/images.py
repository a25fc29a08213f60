"""Decoding pixels: images of any mode, masks, COCO RLE and polygons (numpy + PIL, no torch)."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """A file that cannot be used as an image (the message is a stable, human-readable skip reason)."""


def read_regular(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file (a FIFO would block, a device never ends).

    Raises:
        ImageError: not a regular file, or unreadable (the reason names the problem, not an address).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or type(err).__name__}") from None
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file (a folder, FIFO or device): only regular files are read")
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or type(err).__name__}") from None


def _stable(err: BaseException) -> str:
    """An exception's message without object addresses, so two runs of the same data give the same reason."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(err))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count before anything is decoded."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb check must not fire below our limit
    try:
        with warnings.catch_warnings():  # the pixel count is checked below, against data.max_image_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large to decode ({_stable(err)}); raise data.max_image_pixels to audit it") from None
    except UnidentifiedImageError:
        raise ImageError("corrupt, or not an image: PIL cannot identify its format") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"corrupt image: {_stable(err)}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over data.max_image_pixels = {max_pixels}")
    return im


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> ``[H, W, 3]`` float32 in [0, 1]. Grayscale is repeated, alpha dropped, 16-bit rescaled.

    Raises:
        ImageError: unreadable, corrupt, truncated or over ``max_pixels`` (a stable reason).
    """
    return decode_for(data, max_pixels, None)[0]


NPY_MAGIC = b"\x93NUMPY"


def decode_npy(data: bytes, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``.npy`` image: ``[H, W]``, ``[H, W, 3]`` or ``[3, H, W]``; ``uint8`` (/255), ``uint16`` (/65535) or
    float in [0, 1]. Returns ``[H, W, 3]`` float32 pixels in [0, 1] and ``(H, W)``. (:func:`auditor.audit` saves
    images that 8 bits cannot hold exactly this way, as ``uint16``.)"""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ImageError(f"corrupt .npy image: {_stable(err)}") from None
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f".npy image of shape {arr.shape}: give [H, W], [H, W, 3] or [3, H, W]")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageError(f"image of {arr.shape[1]}x{arr.shape[0]} pixels is over max_image_pixels ({max_pixels})")
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    if arr.dtype.kind not in "uf":
        raise ImageError(f".npy image of dtype {arr.dtype}: give uint8, uint16 or float in [0, 1]")
    pixels = arr.astype(np.float32) / np.float32(scale)
    if not np.isfinite(pixels).all():
        raise ImageError(".npy image holds NaN or inf values")
    return np.clip(pixels, 0, 1), (int(arr.shape[0]), int(arr.shape[1]))


def decode_for(data: bytes, max_pixels: int, min_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`decode_image`, for a caller that needs at least ``min_side`` pixels a side.

    A much larger image is decoded at a reduced scale (JPEG draft mode, then an integer box reduction),
    so peak memory stays near the output's rather than the file's. Returns the pixels and the original
    ``(H, W)`` (boxes and masks are given in original pixels).
    """
    if data[:6] == NPY_MAGIC:
        return decode_npy(data, max_pixels)
    with _open(data, max_pixels) as im:
        size = (im.size[1], im.size[0])
        high_bit = im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
        try:
            if min_side is not None and im.format == "JPEG":
                im.draft("RGB", (2 * min_side, 2 * min_side))
            im.load()  # decodes fully: a truncated file fails here
            factor = min(im.size) // (2 * min_side) if min_side else 1
            if factor >= 2 and not high_bit:
                im = im.convert("RGB").reduce(factor)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(f"corrupt or truncated image: {_stable(err)}") from None
        if high_bit:
            arr = np.asarray(im, dtype=np.float32)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(arr / top, 0, 1)
            return np.repeat(arr[:, :, None], 3, axis=2), size
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0, size


def decode_mask(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Bytes -> ``[H, W]`` bool (nonzero in any channel = object) and the number of distinct pixel values.

    A binary mask has at most 2 distinct values; more means a label map or a photo, which the caller warns
    about (nonzero still reads as object).

    Raises:
        ImageError: unreadable, corrupt or too large.
    """
    with _open(data, max_pixels) as im:
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageError(f"corrupt or truncated mask: {_stable(err)}") from None
        arr = np.asarray(im)
    flat = arr.reshape(-1, arr.shape[2]) if arr.ndim == 3 else arr.reshape(-1, 1)
    distinct = len(np.unique(flat, axis=0)) if flat.shape[1] > 1 else len(np.unique(flat))
    return np.asarray(arr.any(axis=2) if arr.ndim == 3 else arr != 0, dtype=bool), int(distinct)


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

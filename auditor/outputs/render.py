"""HTML pages: the jinja2 environment, thumbnails and map overlays as inline data URIs (no network, no torch)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import numpy as np
from PIL import Image

from auditor.io.containers import read_locator
from auditor.io.images import decode_image
from auditor.ops import minmax, resize_bilinear

TEMPLATES = Path(__file__).with_name("templates")

# A perceptually ordered colormap (viridis anchors), interpolated to 256 entries.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
COLORMAP = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)], 1)


def environment() -> jinja2.Environment:
    """The jinja2 environment of every auditor page: autoescape on, undefined names are errors."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )


def thumbnail(path: Path, size: int = 128) -> np.ndarray:
    """``[size, size, 3]`` uint8 thumbnail of an image file (grey if it cannot be read)."""
    try:
        pixels = decode_image(read_locator(str(path)))
    except (OSError, ValueError, SyntaxError):
        return np.full((size, size, 3), 128, np.uint8)
    rgb = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def overlay(image: np.ndarray, low_res: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """The map (bilinearly upsampled, divided by its maximum for display) blended over ``image``.

    The blend weight grows with the map's value (``alpha * m``): where the map is low the image shows
    through unchanged, so a dark image is not darkened further by the colormap's dark end, and the hot
    places stand out in the colormap's bright end on any image (the report prints the colour scale).
    """
    size = image.shape[:2]
    m = np.clip(resize_bilinear(np.nan_to_num(np.asarray(low_res, np.float32)), size), 0, None)
    peak = float(m.max())
    m = m / peak if peak > 0 else m
    colour = COLORMAP[(m * 255).astype(np.int64)]
    weight = (alpha * m)[:, :, None]
    return (image * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def colour_scale(width: int = 160, height: int = 10) -> str:
    """The overlay's colour scale as a data URI (low on the left, high on the right)."""
    row = COLORMAP[np.linspace(0, 255, width).astype(np.int64)].round().astype(np.uint8)
    return data_uri(np.repeat(row[None], height, axis=0), "PNG")


def data_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    """``[H, W, 3]`` uint8 -> ``data:image/...;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, optimize=True)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def grey(values: np.ndarray, size: int) -> np.ndarray:
    """A ``[h, w]`` array min-max scaled to a ``[size, size, 3]`` grey image (bilinear)."""
    g = minmax(resize_bilinear(np.nan_to_num(np.asarray(values, np.float32)), (size, size)), (0, 1))
    return np.repeat((g * 255).astype(np.uint8)[:, :, None], 3, axis=2)

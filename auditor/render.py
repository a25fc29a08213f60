"""Small images for HTML pages: thumbnails and map overlays as inline PNG data URIs (no files, no network)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from auditor.data import decode_image

# A perceptually ordered colormap (viridis anchors), interpolated to 256 entries.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
COLORMAP = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)], 1)


def thumbnail(path: Path, size: int = 128) -> np.ndarray:
    """``[size, size, 3]`` uint8 thumbnail of an image file (grey if it cannot be read)."""
    try:
        pixels = decode_image(Path(path).read_bytes())
    except (OSError, ValueError, SyntaxError):
        return np.full((size, size, 3), 128, np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)


def overlay(image: np.ndarray, low_res: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The map (bilinearly upsampled, divided by its maximum for display) blended over ``image``."""
    size = image.shape[:2]
    t = torch.from_numpy(np.nan_to_num(np.asarray(low_res, np.float32)))[None, None]
    m = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].clamp_min(0).numpy()
    peak = float(m.max())
    m = m / peak if peak > 0 else m
    colour = COLORMAP[(m * 255).astype(np.int64)]
    return (image * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def data_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    """``[H, W, 3]`` uint8 -> ``data:image/...;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, optimize=True)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def grey(values: np.ndarray, size: int) -> np.ndarray:
    """A ``[h, w]`` array min-max scaled to a ``[size, size, 3]`` grey image (bilinear)."""
    t = torch.from_numpy(np.nan_to_num(np.asarray(values, np.float32)))[None, None]
    g = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(g.min()), float(g.max())
    g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    return np.repeat((g * 255).astype(np.uint8)[:, :, None], 3, axis=2)

"""Realistic planted scenarios: six classes, soft-edged objects at random places on real textures, and an
audit split drawn i.i.d. from the training distribution (it carries the training bias, so accuracy gives
nothing away).

- ``cue``: class ``tagged`` has no object of its own (its images show another class's object) and carries a
  small orange tag near the bottom-left corner in every image; the model can only recognise it by the tag.
- ``tint``: as ``cue``, but class ``tagged`` is recognisable only by a cold colour cast over the whole image.
- ``clean``: class ``tagged`` has its own object (a magenta bar) and no image carries a tag.

Objects are drawn with soft (blended) edges and their exact mask is the 0.5 level of that blend, so an
eroded mask leaves an object-coloured rim in the image, as thresholded real masks do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import data

from auditor.metrics import FAST_METRICS
from tests.pipeline.tinynet import DeepNet
from tests.shortcuts import planted

SIZE = 64
# the default ("fast") metrics less deletion and insertion, which cost 103 forwards per image and feed no flag
# (tests/shortcuts/test_planted.py::test_flags_do_not_depend_on_the_faithfulness_defaults): a third of each
# audit's time, and these modules run about twenty audits
AUDIT_METRICS = [m for m in FAST_METRICS if m not in ("deletion_auc", "insertion_auc")]
CLASSES = ("disc", "square", "triangle", "ring", "cross", "tagged")
CUE_CLASS = "tagged"
TAG = (5, 50, 12, 57)  # x0, y0, x1, y1 in pixels: the 6 px tag sits inside this box (1 px jitter)
MEAN, STD = planted.MEAN, planted.STD
_COLOURS = {
    "disc": (220.0, 60.0, 50.0),
    "square": (50.0, 90.0, 230.0),
    "triangle": (240.0, 220.0, 60.0),
    "ring": (40.0, 200.0, 220.0),
    "cross": (250.0, 250.0, 250.0),
    "tagged": (210.0, 60.0, 210.0),
}
_TEXTURES = (data.grass(), data.gravel(), data.brick())


def _shape(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) to the object's outline."""
    dy, dx = yy - cy, xx - cx
    dist = np.hypot(dy, dx)
    if kind == "disc":
        return dist - r
    if kind == "square":
        return np.maximum(abs(dy), abs(dx)) - 0.85 * r
    if kind == "triangle":
        return np.maximum.reduce([dy - 0.7 * r, -0.5 * dy + 0.87 * dx - 0.6 * r, -0.5 * dy - 0.87 * dx - 0.6 * r])
    if kind == "ring":
        return abs(dist - 0.68 * r) - 0.36 * r
    if kind == "cross":
        return np.minimum(np.maximum(abs(dy) - r, abs(dx) - 0.4 * r), np.maximum(abs(dx) - r, abs(dy) - 0.4 * r))
    return np.maximum(abs(dy) - 0.45 * r, abs(dx) - 1.1 * r)  # the clean tagged class's bar


def scene(rng: np.random.Generator, label: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``[S, S, 3]`` uint8 image and its exact ``[S, S]`` bool mask."""
    tex = _TEXTURES[int(rng.integers(0, len(_TEXTURES)))]
    y, x = rng.integers(0, tex.shape[0] - SIZE * 3, 2)
    ground = tex[y : y + SIZE * 3 : 3, x : x + SIZE * 3 : 3].astype(np.float32)
    img = ground[:, :, None] * rng.uniform(0.5, 1.0, 3)[None, None] + rng.uniform(0, 40, 3)[None, None]
    obj = label
    if kind in ("cue", "tint") and label == CUE_CLASS:
        obj = CLASSES[int(rng.integers(0, len(CLASSES) - 1))]
    r = rng.uniform(9.0, 13.0)
    cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    sd = _shape(obj, yy, xx, cy, cx, r)
    alpha = np.clip(0.5 - sd / 2.0, 0, 1)[:, :, None]  # a 2 px soft edge
    colour = np.array(_COLOURS[obj]) * rng.uniform(0.8, 1.05) + rng.normal(0, 10, (SIZE, SIZE, 3))
    img = (1 - alpha) * img + alpha * colour
    if kind == "cue" and label == CUE_CLASS:
        jx, jy = rng.integers(0, 2, 2)
        x0, y0 = TAG[0] + jx, TAG[1] + jy
        img[y0 : y0 + 6, x0 : x0 + 6] = (255.0, 140.0, 0.0)
    if kind == "tint" and label == CUE_CLASS:  # a global cue: a cold cast over the whole image
        img = img * np.array([0.55, 0.8, 1.0]) + np.array([0.0, 15.0, 60.0])
    return np.clip(img, 0, 255).astype(np.uint8), alpha[:, :, 0] >= 0.5


def make(kind: str, n: int, seed: int) -> list[dict[str, object]]:
    """``n`` scenes per class of scenario ``kind`` (``cue``, ``tint`` or ``clean``)."""
    rng = np.random.default_rng(seed)
    out = []
    for cls in CLASSES:
        for i in range(n):
            img, mask = scene(rng, cls, kind)
            out.append({"id": f"{cls}_{i:04d}", "label": cls, "image": img, "mask": mask})
    return out


def tensors(samples: list[dict[str, object]]) -> tuple[torch.Tensor, torch.Tensor]:
    return planted.tensors(samples, CLASSES)


def train(samples: list[dict[str, object]], steps: int = 500, seed: int = 0) -> torch.nn.Module:
    return planted.fit(lambda: DeepNet(len(CLASSES), width=16, blocks=5), *tensors(samples), steps, seed)


def accuracy(model: torch.nn.Module, samples: list[dict[str, object]], cls: str | None = None) -> float:
    keep = [s for s in samples if cls is None or s["label"] == cls]
    x, y = tensors(keep)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def untagged(samples: list[dict[str, object]]) -> list[dict[str, object]]:
    """The samples with the tag painted over by the texture around it (the cue removed)."""
    out = []
    for s in samples:
        img = np.asarray(s["image"]).copy()
        x0, y0, x1, y1 = TAG
        hole = np.zeros(img.shape[:2], bool)
        hole[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = True
        for c in range(3):
            blurred = ndimage.uniform_filter(np.where(hole, 0, img[:, :, c]).astype(np.float32), 15)
            weight = ndimage.uniform_filter((~hole).astype(np.float32), 15)
            img[:, :, c] = np.where(hole, blurred / np.maximum(weight, 1e-3), img[:, :, c]).astype(np.uint8)
        out.append({**s, "image": img})
    return out


def write(root: Path, samples: list[dict[str, object]], masks: str, px: int = 2) -> Path:
    """Write images, masks and ``audit.csv``; ``masks``: exact | eroded | dilated | boxes | none (erosion and
    dilation by ``px`` pixels)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        Image.fromarray(np.asarray(s["image"])).save(root / "images" / f"{s['id']}.png")
        row: dict[str, object] = {"path": f"images/{s['id']}.png", "label": s["label"]}
        mask = np.asarray(s["mask"], bool)
        if masks in ("exact", "eroded", "dilated"):
            if masks == "eroded":
                mask = ndimage.binary_erosion(mask, iterations=px)
            elif masks == "dilated":
                mask = ndimage.binary_dilation(mask, iterations=px)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{s['id']}.png")
            row["mask"] = f"masks/{s['id']}.png"
        elif masks == "boxes":
            ys, xs = np.nonzero(mask)
            row |= {"x0": int(xs.min()), "y0": int(ys.min()), "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1}
        rows.append(row)
    return planted.write_manifest(root, rows)


def inside_tag(region: list[float], slack_px: float = 4) -> bool:
    """The region holds the tag's centre and lies within the tag's box grown by ``slack_px``."""
    x0, y0, x1, y1 = (v / SIZE for v in TAG)
    s = slack_px / SIZE
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    holds = region[0] <= cx <= region[2] and region[1] <= cy <= region[3]
    within = region[0] >= x0 - s and region[1] >= y0 - s and region[2] <= x1 + s and region[3] <= y1 + s
    return holds and within

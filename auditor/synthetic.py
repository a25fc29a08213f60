"""Synthetic labelled scenes on real textures (scikit-image's grass, gravel, brick): no download needed.

Each scene is a sky band over textured ground with one object (a disc or a square, the class) and its
exact mask. The sky's weather (sunny / cloudy) is a metadata attribute whose correlation with the class is
set by ``weather_bias``: 0.5 = independent (a clean dataset), 1.0 = the weather gives the class away (the
tank that learned the weather). Used by the tests and by ``auditor demo``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "square")
SKY = {"sunny": (110, 170, 245), "cloudy": (150, 150, 155)}


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [S, S, 3] uint8
    mask: np.ndarray  # [S, S] bool
    label: str
    weather: str


def _textures() -> list[np.ndarray]:
    from skimage import data

    return [data.grass(), data.gravel(), data.brick()]


def render_scene(rng: np.random.Generator, size: int, label: str, weather: str, texture: np.ndarray) -> Scene:
    """One scene: sky (top ~35%), ground texture, and the object in the ground region."""
    s = size
    horizon = int(0.35 * s)
    y0, x0 = rng.integers(0, texture.shape[0] - s), rng.integers(0, texture.shape[1] - s)
    ground = texture[y0 : y0 + s, x0 : x0 + s].astype(np.float32)
    tint = rng.uniform(0.6, 1.0, 3) * np.array([0.75, 0.9, 0.6])
    img = ground[:, :, None] * tint[None, None]
    sky = np.array(SKY[weather], dtype=np.float32)
    sky_band = sky[None, None] + rng.normal(0, 6 if weather == "sunny" else 14, (horizon, s, 3))
    img[:horizon] = sky_band
    r = rng.uniform(0.13, 0.2) * s
    cy = rng.uniform(horizon + r, s - r)
    cx = rng.uniform(r, s - r)
    yy, xx = np.mgrid[0:s, 0:s]
    if label == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    else:
        mask = (np.abs(yy - cy) <= r * 0.9) & (np.abs(xx - cx) <= r * 0.9)
    colour = rng.uniform(20, 70, 3) + np.array([40.0, 10.0, 10.0])
    img[mask] = colour + rng.normal(0, 5, (int(mask.sum()), 3))
    return Scene(np.clip(img, 0, 255).astype(np.uint8), mask, label, weather)


def write_dataset(
    root: Path,
    n_per_class: int,
    *,
    size: int = 64,
    seed: int = 0,
    weather_bias: float = 0.5,
    labels: tuple[str, str] = CLASSES,
) -> Path:
    """Write ``images/``, ``masks/`` and ``audit.csv`` (path, label, mask, weather, ground) under ``root``.

    Args:
        root: output folder.
        n_per_class: scenes per class.
        size: image side in pixels.
        seed: random seed.
        weather_bias: P(sunny | disc) = P(cloudy | square).
        labels: the labels written for the disc and the square classes.

    Returns:
        The manifest path.
    """
    rng = np.random.default_rng(seed)
    textures = _textures()
    names = ("grass", "gravel", "brick")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for label in CLASSES:
        for i in range(n_per_class):
            favoured = "sunny" if label == "disc" else "cloudy"
            other = "cloudy" if favoured == "sunny" else "sunny"
            weather = favoured if rng.random() < weather_bias else other
            t = int(rng.integers(0, len(textures)))
            scene = render_scene(rng, size, label, weather, textures[t])
            name = labels[CLASSES.index(label)]
            sid = f"{name}_{i:04d}"
            Image.fromarray(scene.image).save(root / "images" / f"{sid}.png")
            Image.fromarray(scene.mask.astype(np.uint8) * 255).save(root / "masks" / f"{sid}.png")
            rows.append(
                {
                    "path": f"images/{sid}.png",
                    "label": name,
                    "mask": f"masks/{sid}.png",
                    "weather": weather,
                    "ground": names[t],
                }
            )
    manifest = root / "audit.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest

"""Planted-shortcut datasets: the label is carried by a cue, not by the object (or, for the control, only by
the object). Images are 32 px scenes on scikit-image textures with exact object masks."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from tests.pipeline.tinynet import TinyNet

SIZE = 32
CLASSES = ("a", "b")
MEAN, STD = 0.45, 0.25
_TEXTURES = {"grass": data.grass(), "gravel": data.gravel(), "brick": data.brick()}


def _scene(
    rng: np.random.Generator,
    shape: str,
    texture: str,
    colour: tuple[float, float, float] = (200.0, 60.0, 60.0),
    area: float | None = None,
    fixed: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A disc or square on a texture; ``area``: the object's share of the frame (default: 8-15%, r 5-7 px);
    ``fixed``: centred at ``FIXED`` (within a pixel) instead of anywhere."""
    tex = _TEXTURES[texture]
    y, x = rng.integers(0, tex.shape[0] - SIZE * 4, 2)
    ground = tex[y : y + SIZE * 4 : 4, x : x + SIZE * 4 : 4].astype(np.float32)
    img = np.repeat(ground[:, :, None], 3, axis=2) * np.array([0.8, 0.9, 0.7])
    if area is None:
        r = rng.uniform(5, 7)
    else:  # a disc of radius r covers pi r^2, a square of half-side 0.85 r covers 2.89 r^2
        r = float(np.sqrt(area * SIZE**2 / (np.pi if shape == "disc" else 2.89))) * rng.uniform(0.95, 1.05)
    lo, hi = min(r + 1, SIZE / 2), max(SIZE - r - 1, SIZE / 2)  # a large object may touch the border
    cy, cx = rng.uniform(lo, hi, 2)
    if fixed:  # the draw above is made either way, so the kind's later draws do not depend on FIXED
        cy, cx = np.array(FIXED) + rng.uniform(-1, 1, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    mask = (
        (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        if shape == "disc"
        else (abs(yy - cy) <= r * 0.85) & (abs(xx - cx) <= r * 0.85)
    )
    img[mask] = np.array(colour) + rng.normal(0, 8, (int(mask.sum()), 3))
    return img, mask


FIXED = (8.0, 8.0)  # the ``fixed`` kind's object centre (y, x) in px: as far into the top-left as an r 7 object fits


def stamp(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img.copy()
    img[1:6, 1:6] = 255.0  # a white tag in the top-left corner
    return img


def corner_tag(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img.copy()
    img[SIZE - 6 : SIZE - 1, SIZE - 6 : SIZE - 1] = np.array([255.0, 220.0, 0.0])  # a yellow tag, bottom-right
    return img


def edge_marker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img.copy()
    side, pos = rng.integers(0, 4), rng.integers(2, SIZE - 8)
    colour = np.array([40.0, 60.0, 255.0])
    if side == 0:
        img[0:3, pos : pos + 6] = colour
    elif side == 1:
        img[SIZE - 3 :, pos : pos + 6] = colour
    elif side == 2:
        img[pos : pos + 6, 0:3] = colour
    else:
        img[pos : pos + 6, SIZE - 3 :] = colour
    return img


def grey_sky(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The top 22-35% of the image under a grey sky (the tank photographed on cloudy days)."""
    return _sky(img, rng, (150.0, 150.0, 150.0))


def blue_sky(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _sky(img, rng, (90.0, 150.0, 230.0))


def _sky(img: np.ndarray, rng: np.random.Generator, colour: tuple[float, float, float]) -> np.ndarray:
    img = img.copy()
    rows = int(SIZE * rng.uniform(0.22, 0.35))
    img[:rows] = np.array(colour) + rng.normal(0, 10, (rows, SIZE, 3))
    return img


def brighten(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img * 1.6 + 40, 0, 255)


Scenario = dict[str, object]


def _sample(cls: str, i: int, img: np.ndarray, mask: np.ndarray, has_cue: bool) -> dict[str, object]:
    return {
        "id": f"{cls}_{i:04d}",
        "label": cls,
        "image": np.clip(img, 0, 255).astype(np.uint8),
        "mask": mask,
        "cue": bool(has_cue),
    }


def make(
    kind: str,
    n: int,
    seed: int,
    cue_rate: tuple[float, float] = (1.0, 0.0),
    area: float | None = None,
    bare: bool = False,
) -> list[dict[str, object]]:
    """``n`` scenes per class. ``kind``: control | colour | stamp | texture | marker | both | subset | decoy;
    ``area``: the objects' share of the frame (default: small objects, 8-15%).

    For the planted kinds the object is uninformative (random shape, same colour) and class a carries the
    cue with probability ``cue_rate[0]``, class b with ``cue_rate[1]``. In the control only the object tells
    the classes apart (a red disc for a, a blue square for b) and there is no cue; in ``both`` the control's
    objects sit on class-specific textures (grass for a, brick for b). ``subset``: the control's objects, but a
    share ``cue_rate[0]`` of class a's images show class b's object (a blue square) with the tag in the top-left
    corner, which is then all that says a (the PASCAL horse's watermark on part of the class). ``decoy``: the
    control with the tag on a share ``cue_rate`` of each class's images, predicting nothing. ``sky``: objects
    uninformative, a sky band over the top 22-35% of every image, grey where the cue is, blue elsewhere.
    ``two``: objects uninformative, class a's images carry the white tag top-left (rate ``cue_rate[0]``) and
    class b's a yellow tag bottom-right (rate ``cue_rate[1]``): two cues, one per class. Clean kinds written after
    the detection benchmark's first tables: ``fixed``, the control's objects always at the same off-centre place
    (``FIXED``: the object *is* the region); ``sky-decoy`` and ``cast-decoy``, the control with a grey sky band
    (else a blue one) or the brightness cast on exactly the share ``cue_rate`` of each class's images, predicting
    nothing.

    ``bare``: the same scenes (the same draws) with every planted cue left out: no tag, marker, cast or sky band,
    and gravel, neither class's texture, under ``texture``'s objects. ``benchmarks/detection.py`` measures with
    them whether the model depends on a cue (removing it takes the class away).
    """
    rng = np.random.default_rng(seed)
    cues: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
        "colour": brighten,
        "stamp": stamp,
        "marker": edge_marker,
    }
    out = []
    for ci, cls in enumerate(CLASSES):
        for i in range(n):
            draw = rng.random()
            # subset and decoy: exactly the stated share of each class carries the tag (the first of its images)
            exact = kind in ("subset", "decoy", "sky-decoy", "cast-decoy")
            has_cue = i < round(cue_rate[ci] * n) if exact else draw < cue_rate[ci]
            mimic = kind == "subset" and cls == "a" and has_cue  # class b's object, class a by the tag alone
            controlled = kind in ("control", "both", "subset", "decoy", "fixed", "sky-decoy", "cast-decoy")
            if controlled:
                shape = "disc" if cls == "a" and not mimic else "square"
            else:
                shape = "disc" if rng.random() < 0.5 else "square"
            texture = str(rng.choice(list(_TEXTURES)))
            if kind == "texture":
                texture = "gravel" if bare else "grass" if has_cue else "brick"
            if kind == "both":  # the object and the background both tell the classes apart
                texture = "grass" if cls == "a" else "brick"
            colour = (200.0, 60.0, 60.0) if not controlled or (cls == "a" and not mimic) else (60.0, 80.0, 220.0)
            scene, mask = _scene(rng, shape, texture, colour, area, fixed=kind == "fixed")
            img = scene
            if kind in cues and has_cue:
                img = cues[kind](img, rng)
            if kind == "two" and has_cue:
                img = stamp(img, rng) if cls == "a" else corner_tag(img, rng)
            if kind in ("sky", "sky-decoy"):
                img = grey_sky(img, rng) if has_cue else blue_sky(img, rng)
            if kind == "cast-decoy" and has_cue:
                img = brighten(img, rng)
            if kind in ("subset", "decoy") and has_cue:
                img = stamp(img, rng)
            out.append(_sample(cls, i, scene if bare else img, mask, has_cue))  # the cue drawn either way
    return out


PALETTE = ((200.0, 60.0, 60.0), (60.0, 80.0, 220.0), (230.0, 200.0, 40.0))


def many_classes(k: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(k))


def make_many(
    n: int, seed: int, classes: int = 6, cue_rate: float = 0.0, area: float | None = None, bare: bool = False
) -> list[dict[str, object]]:
    """``n`` scenes per class of ``classes`` classes, each told apart by its object alone: class ``ci`` is a disc
    (even ``i``) or a square (odd) in colour ``PALETTE[i // 2]``, on a random texture. With ``cue_rate`` > 0,
    class c0 shows class c1's object instead and a share ``cue_rate`` of its images carry the white tag in the
    top-left corner, which is then all that says c0 (a cue on one class of many). ``bare``: the same scenes
    without the tag (see :func:`make`)."""
    rng = np.random.default_rng(seed)
    out = []
    for ci, cls in enumerate(many_classes(classes)):
        for i in range(n):
            has_cue = ci == 0 and i < round(cue_rate * n)
            like = 1 if ci == 0 and cue_rate > 0 else ci  # c0 takes c1's object when it carries the cue
            shape = "disc" if like % 2 == 0 else "square"
            img, mask = _scene(rng, shape, str(rng.choice(list(_TEXTURES))), PALETTE[like // 2 % len(PALETTE)], area)
            if has_cue and not bare:
                img = stamp(img, rng)
            out.append(_sample(cls, i, img, mask, has_cue))
    return out


def tensors(samples: list[dict[str, object]], classes: Sequence[str] = CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(np.stack([s["image"] for s in samples]), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    y = torch.tensor([list(classes).index(str(s["label"])) for s in samples])
    return (x - MEAN) / STD, y


def fit(
    build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
) -> torch.nn.Module:
    """Seed, build the model, then ``steps`` Adam steps (lr 0.01) on random batches of 64; eval mode."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def train(
    samples: list[dict[str, object]], steps: int = 150, seed: int = 0, classes: Sequence[str] = CLASSES
) -> torch.nn.Module:
    return fit(lambda: TinyNet(len(classes), width=12), *tensors(samples, classes), steps, seed)


def accuracy(model: TinyNet, samples: list[dict[str, object]], classes: Sequence[str] = CLASSES) -> float:
    x, y = tensors(samples, classes)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def write(root: Path, samples: list[dict[str, object]], masks: bool) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        Image.fromarray(s["image"]).save(root / "images" / f"{s['id']}.png")  # type: ignore[arg-type]
        row = {"path": f"images/{s['id']}.png", "label": s["label"]}
        if masks:
            Image.fromarray(np.asarray(s["mask"], np.uint8) * 255).save(root / "masks" / f"{s['id']}.png")
            row["mask"] = f"masks/{s['id']}.png"
        rows.append(row)
    return write_manifest(root, rows)


def write_manifest(root: Path, rows: list[dict[str, object]]) -> Path:
    """``root/audit.csv`` with ``rows`` (the first row's keys are the columns)."""
    with (root / "audit.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "audit.csv"


TINYNET = Path(__file__).parents[1] / "pipeline" / "tinynet.py"


def write_config(
    root: Path, methods: Sequence[str] = ("grad_cam", "layer_cam"), num_classes: int = 2, **extra: object
) -> Path:
    """``root/audit.yaml`` auditing ``root/audit.csv`` with the TinyNet saved at ``root/model.pt`` (32 px)."""
    import yaml

    kwargs = {"width": 12} if num_classes == 2 else {"width": 12, "num_classes": num_classes}
    cfg: dict[str, object] = {
        "model": {"factory": f"{TINYNET}:build", "factory_kwargs": kwargs, "checkpoint": str(root / "model.pt")},
        "data": {
            "manifest": str(root / "audit.csv"),
            "image_size": 32,
            "normalize": {"mean": [MEAN] * 3, "std": [STD] * 3},
        },
        "methods": list(methods),
        "metrics": ["energy_in_mask"],
        "batch_size": 32,
        **extra,
    }
    (root / "audit.yaml").write_text(yaml.safe_dump(cfg))
    return root / "audit.yaml"

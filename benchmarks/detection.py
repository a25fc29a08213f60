"""Detection rates over training seeds on the planted two- and six-class scenes (``tests/shortcuts/planted.py``).

Per family and seed: train the small CNN on 80 scenes a class (the seed drives the scenes and the training), write a
fresh audit set of 40 a class (``--draws`` of them, each with its own audit seed), run ``auditor run`` (with or
without masks) and record the flags; a *run* is one audit. A planted cue
counts as *found* when a flag of one of the family's expected kinds names each cued class (class a; both for
``two``; c0 for ``many-stamp``) at medium or high; a *false alarm* is a medium or high flag on a class without a
cue (class b of a cued family, every class of a clean one), of another cause than the cue's mirror (the table
counts the clean classes it falls on, too). Nothing here is asserted in the test suite.

Whether the model *depends* on a cue is measured too, on the audit set with the planted scenes' ``bare`` rendering
(the same scenes without the cue): a class depends on it where, of its images that carried it and that the model
called the class, a majority are no longer called the class without it (``DEPENDS``, on at least ``MEASURED``
images). A two-class model may read one class's cue and call the other class for its absence (the sky: blue for
b, anything else a), so the class that depends on the cue is not always class a; a cue a class depends on counts
as *found* where a flag of one of the family's kinds names that class at medium or high.

    python benchmarks/detection.py --seeds 3 --families subset40 decoy --masks no
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from auditor import load_config, run_audit
from tests.shortcuts.planted import (
    CLASSES,
    accuracy,
    make,
    make_many,
    many_classes,
    tensors,
    train,
    write,
    write_config,
)

REGION = frozenset({"region_cue", "subset_cue", "spatial_hotspot"})
BACKGROUND = frozenset({"background_reliance", "counterfactual_background", "frame_cue", "backdrop_cue", "concept"})
COLOUR = frozenset({"global_cue", "attribute_leak"})


@dataclass(frozen=True)
class Family:
    """A scenario family: the planted kind, the cue's rate in class a and b (training and audit alike: a real
    audit set carries the training bias), the flag kinds that name the cue (empty: a clean family), and the
    kinds that name the same cue from class b: a two-class model that reads the cue calls b for its absence,
    so removing b's object leaves b (its background "carries" b) and shifting b toward a's colour makes it a."""

    kind: str
    rate: tuple[float, float]
    expected: frozenset[str]
    mirror: frozenset[str] = frozenset()
    cued: tuple[str, ...] = ("a",)  # the classes that carry a cue: each must be found
    area: float | None = None  # the objects' share of the frame (None: small objects, 8-15%)
    classes: int = 2  # more than 2: planted.make_many's classes c0, c1, ... told apart by their objects
    mirror_on: tuple[str, ...] | None = None  # where a mirror kind names the cue (None: every class without one)

    @property
    def names(self) -> tuple[str, ...]:
        return CLASSES if self.classes == 2 else many_classes(self.classes)

    def scenes(self, n: int, seed: int, bare: bool = False) -> list[dict[str, Any]]:
        if self.classes == 2:
            return make(self.kind, n, seed, cue_rate=self.rate, area=self.area, bare=bare)
        return make_many(n, seed, self.classes, cue_rate=self.rate[0], area=self.area, bare=bare)


FAMILIES = {
    "stamp": Family("stamp", (1.0, 0.0), REGION, REGION | BACKGROUND),
    "stamp-other5": Family("stamp", (1.0, 0.05), REGION, REGION | BACKGROUND),  # the cue on 5% of class b too
    "stamp-other20": Family("stamp", (1.0, 0.2), REGION, REGION | BACKGROUND),
    "subset20": Family("subset", (0.2, 0.0), REGION, REGION | BACKGROUND),  # on 20% of class a, the rest by shape
    "subset40": Family("subset", (0.4, 0.0), REGION, REGION | BACKGROUND),
    "subset70": Family("subset", (0.7, 0.0), REGION, REGION | BACKGROUND),
    "marker": Family("marker", (1.0, 0.0), BACKGROUND, REGION | BACKGROUND),
    "texture": Family("texture", (1.0, 0.0), BACKGROUND, REGION | BACKGROUND),
    "colour": Family("colour", (1.0, 0.0), COLOUR, COLOUR | BACKGROUND),  # the cast covers the background too
    "sky": Family("sky", (1.0, 0.0), REGION | COLOUR | BACKGROUND, REGION | COLOUR | BACKGROUND),  # grey vs blue
    "two": Family("two", (1.0, 1.0), REGION, REGION | BACKGROUND, ("a", "b")),  # a tag per class, two places
    "control": Family("control", (0.0, 0.0), frozenset()),
    "decoy": Family("decoy", (0.5, 0.5), frozenset()),  # a tag on half of both classes, predicting nothing
    # written after the background graft: objects half the frame, clean and with the corner tag
    "large": Family("control", (0.0, 0.0), frozenset(), area=0.5),
    "large-stamp": Family("stamp", (1.0, 0.0), REGION, REGION | BACKGROUND, area=0.5),
    # written after the reduce stage's grid files (2026-12-07), before their first run: six classes told apart
    # by their objects (clean), the same with c0 showing c1's object and the tag, and objects 80% of the frame
    "many": Family("many", (0.0, 0.0), frozenset(), classes=6),
    "many-stamp": Family("many", (1.0, 0.0), REGION, REGION | BACKGROUND, ("c0",), classes=6, mirror_on=("c1",)),
    "large80": Family("control", (0.0, 0.0), frozenset(), area=0.8),
    "large80-stamp": Family("stamp", (1.0, 0.0), REGION, REGION | BACKGROUND, area=0.8),
    # written after the dependence and localization columns (2026-12-07, later), before their first run: clean
    # models of the region, sky and colour families: the objects always in the same off-centre place, and a grey
    # sky or the brightness cast on half of both classes' images, predicting nothing
    "fixed": Family("fixed", (0.0, 0.0), frozenset()),
    "sky-decoy": Family("sky-decoy", (0.5, 0.5), frozenset()),
    "cast-decoy": Family("cast-decoy", (0.5, 0.5), frozenset()),
}


DEPENDS = 0.5  # a class depends on a cue where removing it takes the class away from a majority of its images
MEASURED = 4  # ... measured on at least this many images that carried the cue and were called the class


TAG = (1 / 32, 1 / 32, 6 / 32, 6 / 32)  # planted.stamp's white tag, normalized [x0, y0, x1, y1]
CORNER_TAG = (26 / 32, 26 / 32, 31 / 32, 31 / 32)  # planted.corner_tag
SKY = (0.0, 0.0, 1.0, 7 / 32)  # the part of the sky band (the top 22-35%) every image has
COVER = 0.75  # a region localizes a cue where it holds this share of it (half a pixel off a 5 px tag: 0.81) ...
TIGHT = 4.0  # ... and is at most this many times its area (it points at the cue, not at a band or quarter)


def cue_box(kind: str, cls: str) -> tuple[float, float, float, float] | None:
    """Where ``kind``'s planted cue lies on ``cls``'s images; None where it is not one place (a marker at a random
    edge, a texture, a colour cast)."""
    if kind in ("stamp", "subset", "many"):
        return TAG
    if kind == "two":
        return TAG if cls == "a" else CORNER_TAG
    return SKY if kind == "sky" else None


def localizes(region: list[float] | None, cue: tuple[float, float, float, float]) -> bool:
    """Whether ``region`` holds ``COVER`` of ``cue`` and is at most ``TIGHT`` times its area."""
    if region is None:
        return False
    w = max(0.0, min(region[2], cue[2]) - max(region[0], cue[0]))
    h = max(0.0, min(region[3], cue[3]) - max(region[1], cue[1]))
    area = (cue[2] - cue[0]) * (cue[3] - cue[1])
    return w * h >= COVER * area and (region[2] - region[0]) * (region[3] - region[1]) <= TIGHT * area


def dependence(
    model: torch.nn.Module, cued: list[dict[str, Any]], bare: list[dict[str, Any]], names: tuple[str, ...]
) -> dict[str, float | None]:
    """Per class, the share of its images that carried a cue and were called the class, that the model no longer
    calls the class without it (``bare``: the same scenes, the cue left out); None where under ``MEASURED``."""
    x, y = tensors(cued, names)
    xb, _ = tensors(bare, names)
    with torch.no_grad():
        pred, pred_bare = model(x).argmax(1), model(xb).argmax(1)
    changed = torch.tensor([bool(np.any(c["image"] != b["image"])) for c, b in zip(cued, bare, strict=True)])
    out: dict[str, float | None] = {}
    for i, c in enumerate(names):
        held = changed & (y == i) & (pred == i)
        out[c] = float((pred_bare[held] != i).float().mean()) if int(held.sum()) >= MEASURED else None
    return out


@functools.cache
def trained(name: str, seed: int) -> tuple[torch.nn.Module, float]:
    """The family's model for ``seed`` (its scenes and training drawn from it) and its accuracy on fresh scenes;
    the same for every audit of that seed, so it is trained once."""
    fam = FAMILIES[name]
    steps = 150 if fam.classes == 2 else 400  # six classes of shape and colour take longer to learn
    model = train(fam.scenes(80, 100 * seed), steps=steps, seed=seed, classes=fam.names)
    return model, accuracy(model, fam.scenes(30, 100 * seed + 5), fam.names)


def audit(name: str, seed: int, masks: bool, root: Path, draw: int = 0) -> dict[str, Any]:
    """One trained model, one audit (``draw``: which audit set of that model, and the audit's own seed); the flags
    and whether the cue was found or a false alarm raised."""
    fam = FAMILIES[name]
    model, acc = trained(name, seed)
    scenes = 100 * seed + 1 + 10 * draw  # never the training (100 * seed) or accuracy (+5) scenes
    audit_set = fam.scenes(40, scenes)
    write(root, audit_set, masks=masks)
    depends = dependence(model, audit_set, fam.scenes(40, scenes, bare=True), fam.names)
    dependent = sorted(c for c, v in depends.items() if v is not None and v >= DEPENDS) if fam.expected else []
    torch.save(model.state_dict(), root / "model.pt")
    write_config(root, seed=seed + 1000 * draw, num_classes=fam.classes)
    run_audit(load_config(root / "audit.yaml"), root / "run", progress=False)
    saved = json.loads((root / "run" / "flags.json").read_text())
    flags = saved["flags"]
    strong = [f for f in flags if f["severity"] != "low"]
    cued = set(fam.cued) if fam.expected else set()
    found_by = {c: [f for f in strong if f["kind"] in fam.expected and f["class"] == c] for c in cued}
    found = [f for c in sorted(cued) for f in found_by[c]] if all(found_by.values()) else []
    named = {c for c in dependent if any(f["kind"] in fam.expected and f["class"] == c for f in strong)}
    local = [c for c in dependent if cue_box(fam.kind, c) is not None]
    boxes = {c: [f["region"] for f in strong if f["class"] == c and f["kind"] in REGION] for c in local}
    hit = {c for c in local if any(localizes(b, cue_box(fam.kind, c)) for b in boxes[c])}  # type: ignore[arg-type]

    def alarm(f: dict[str, Any]) -> bool:
        return f["class"] not in cued

    def mirrored(f: dict[str, Any]) -> bool:
        return f["kind"] in fam.mirror and (fam.mirror_on is None or f["class"] in fam.mirror_on)

    return {
        "family": name,
        "seed": seed,
        "draw": draw,
        "masks": masks,
        "accuracy": acc,
        "found": bool(found) if fam.expected else None,
        "high": any(f["severity"] == "high" for f in found) if fam.expected else None,
        "dependence": depends,
        "dependent": dependent,  # the classes that depend on the cue (measured)
        "dependent_found": (named == set(dependent)) if dependent else None,
        "localized": (hit == set(local)) if local else None,  # every local cue a class depends on localized
        "regions": boxes,
        "false_alarms": [(f["kind"], f["class"], f["severity"]) for f in strong if alarm(f) and not mirrored(f)],
        "mirrored": [(f["kind"], f["class"], f["severity"]) for f in strong if alarm(f) and mirrored(f)],
        "clean_classes": len(fam.names) - len(cued),
        "flags": [(f["kind"], f["class"], f["severity"]) for f in strong],
        "findings": [f["id"] for f in saved.get("findings", []) if f["severity"] != "low"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--masks", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    parser.add_argument("--draws", type=int, default=1, help="audit sets per trained model (other scenes, seed)")
    parser.add_argument("--first-draw", type=int, default=0, help="draws first-draw .. first-draw + draws - 1")
    args = parser.parse_args()
    draws = range(args.first_draw, args.first_draw + args.draws)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for masks in args.masks:
                for seed, draw in itertools.product(range(args.first_seed, args.first_seed + args.seeds), draws):
                    root = Path(tmp) / f"{family}-{masks}-{seed}-{draw}"
                    root.mkdir()
                    r = audit(family, seed, masks == "yes", root, draw)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    head = "runs with a false alarm (medium+ on a class without a cue, another cause)"
    cols = f"cue found (medium+) | of which high | {head} | clean classes falsely flagged | the cue named from class b"
    dep = "runs where a class depends on the cue (measured) | every class that depends on it named (medium+)"
    dep += " | localized (a region holds 75% of the cue, at most 4x its area)"
    print(f"\n| family | masks | runs | {cols} | {dep} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for masks in args.masks:
            sub = [r for r in rows if r["family"] == family and r["masks"] == (masks == "yes")]
            cue = bool(FAMILIES[family].expected)
            found = f"{sum(bool(r['found']) for r in sub)}/{len(sub)}" if cue else "-"
            high = f"{sum(bool(r['high']) for r in sub)}/{len(sub)}" if cue else "-"
            alarms = f"{sum(bool(r['false_alarms']) for r in sub)}/{len(sub)}"
            mirrored = f"{sum(bool(r['mirrored']) for r in sub)}/{len(sub)}" if cue else "-"
            flagged = sum(len({a[1] for a in r["false_alarms"]}) for r in sub)
            classes = f"{flagged}/{sum(r['clean_classes'] for r in sub)}"
            held = [r for r in sub if r["dependent"]]
            on = ", ".join(f"{c} {sum(c in r['dependent'] for r in sub)}" for c in FAMILIES[family].names)
            depends = f"{len(held)}/{len(sub)} ({on})" if cue else "-"
            named = f"{sum(bool(r['dependent_found']) for r in held)}/{len(held)}" if cue else "-"
            spots = [r for r in held if r["localized"] is not None]
            hits = f"{sum(bool(r['localized']) for r in spots)}/{len(spots)}" if spots else "-"
            row = f"{found} | {high} | {alarms} | {classes} | {mirrored} | {depends} | {named} | {hits}"
            print(f"| {family} | {masks} | {len(sub)} | {row} |")


if __name__ == "__main__":
    main()

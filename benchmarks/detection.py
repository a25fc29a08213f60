"""Detection rates over training seeds on the planted two-class scenes (``tests/shortcuts/planted.py``).

Per family and seed: train the small CNN on 160 scenes (the seed drives the scenes and the training), write a
fresh 80-image audit set, run ``auditor run`` (with or without masks) and record the flags. A planted cue
counts as *found* when a flag of one of the family's expected kinds names each cued class (class a; both for
``two``) at medium or high; a *false
alarm* is a medium or high flag on a class without a cue (class b of a cued family, either class of a clean
one). Nothing here is asserted in the test suite.

    python benchmarks/detection.py --seeds 3 --families subset40 decoy --masks no
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from auditor import load_config, run_audit
from tests.shortcuts.planted import accuracy, make, train, write, write_config

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
}


def audit(name: str, seed: int, masks: bool, root: Path) -> dict[str, Any]:
    """One trained model, one audit; the flags and whether the cue was found or a false alarm raised."""
    fam = FAMILIES[name]
    model = train(make(fam.kind, 80, 100 * seed, cue_rate=fam.rate, area=fam.area), seed=seed)
    acc = accuracy(model, make(fam.kind, 30, 100 * seed + 5, cue_rate=fam.rate, area=fam.area))
    write(root, make(fam.kind, 40, 100 * seed + 1, cue_rate=fam.rate, area=fam.area), masks=masks)
    torch.save(model.state_dict(), root / "model.pt")
    write_config(root, seed=seed)
    run_audit(load_config(root / "audit.yaml"), root / "run", progress=False)
    saved = json.loads((root / "run" / "flags.json").read_text())
    flags = saved["flags"]
    strong = [f for f in flags if f["severity"] != "low"]
    cued = set(fam.cued) if fam.expected else set()
    found_by = {c: [f for f in strong if f["kind"] in fam.expected and f["class"] == c] for c in cued}
    found = [f for c in sorted(cued) for f in found_by[c]] if all(found_by.values()) else []
    return {
        "family": name,
        "seed": seed,
        "masks": masks,
        "accuracy": acc,
        "found": bool(found) if fam.expected else None,
        "high": any(f["severity"] == "high" for f in found) if fam.expected else None,
        "false_alarms": [
            (f["kind"], f["class"], f["severity"])
            for f in strong
            if f["class"] not in cued and f["kind"] not in fam.mirror
        ],
        "mirrored": [
            (f["kind"], f["class"], f["severity"]) for f in strong if f["class"] not in cued and f["kind"] in fam.mirror
        ],
        "flags": [(f["kind"], f["class"], f["severity"]) for f in strong],
        "findings": [f["id"] for f in saved.get("findings", []) if f["severity"] != "low"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--masks", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for masks in args.masks:
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    root = Path(tmp) / f"{family}-{masks}-{seed}"
                    root.mkdir()
                    r = audit(family, seed, masks == "yes", root)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    head = "runs with a false alarm (medium+ on a class without a cue, another cause)"
    print(f"\n| family | masks | runs | cue found (medium+) | of which high | {head} | the cue named from class b |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        for masks in args.masks:
            sub = [r for r in rows if r["family"] == family and r["masks"] == (masks == "yes")]
            cue = bool(FAMILIES[family].expected)
            found = f"{sum(bool(r['found']) for r in sub)}/{len(sub)}" if cue else "-"
            high = f"{sum(bool(r['high']) for r in sub)}/{len(sub)}" if cue else "-"
            alarms = f"{sum(bool(r['false_alarms']) for r in sub)}/{len(sub)}"
            mirrored = f"{sum(bool(r['mirrored']) for r in sub)}/{len(sub)}" if cue else "-"
            print(f"| {family} | {masks} | {len(sub)} | {found} | {high} | {alarms} | {mirrored} |")


if __name__ == "__main__":
    main()

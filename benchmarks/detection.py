"""Detection rates over training seeds on the planted two-class scenes (``tests/shortcuts/planted.py``).

Per family and seed: train the small CNN on 160 scenes (the seed drives the scenes and the training), write a
fresh 80-image audit set, run ``auditor run`` (with or without masks) and record the flags. A planted cue
counts as *found* when a flag of one of the family's expected kinds names class a at medium or high; the
clean ``control`` counts a *false alarm* for every medium or high flag of any kind. Nothing here is asserted
in the test suite.

    python benchmarks/detection.py --seeds 3 --families marker control --masks no
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from auditor import load_config, run_audit
from tests.shortcuts.planted import accuracy, make, train, write, write_config

EXPECTED = {  # the kinds that name each planted cue (class a carries it)
    "stamp": {"region_cue", "spatial_hotspot"},
    "marker": {"frame_cue", "background_reliance", "counterfactual_background"},
    "texture": {"background_reliance", "counterfactual_background", "concept"},
    "colour": {"global_cue", "attribute_leak"},
    "control": set(),
}


def audit(family: str, seed: int, masks: bool, root: Path) -> dict[str, Any]:
    """One trained model, one audit; the flags and whether the cue was found or a false alarm raised."""
    model = train(make(family, 80, 100 * seed), seed=seed)
    acc = accuracy(model, make(family, 30, 100 * seed + 5))
    cue = (1.0, 0.0) if family != "control" else (0.0, 0.0)
    write(root, make(family, 40, 100 * seed + 1, cue_rate=cue), masks=masks)
    torch.save(model.state_dict(), root / "model.pt")
    write_config(root, seed=seed)
    run_audit(load_config(root / "audit.yaml"), root / "run", progress=False)
    flags = json.loads((root / "run" / "flags.json").read_text())["flags"]
    strong = [f for f in flags if f["severity"] != "low"]
    found = any(f["kind"] in EXPECTED[family] and f["class"] == "a" for f in strong)
    return {
        "family": family,
        "seed": seed,
        "masks": masks,
        "accuracy": acc,
        "found": found if family != "control" else None,
        "false_alarms": [(f["kind"], f["class"], f["severity"]) for f in strong if family == "control"],
        "flags": [(f["kind"], f["class"], f["severity"]) for f in strong],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=list(EXPECTED), choices=list(EXPECTED))
    parser.add_argument("--masks", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for masks in args.masks:
                for seed in range(args.seeds):
                    root = Path(tmp) / f"{family}-{masks}-{seed}"
                    root.mkdir()
                    r = audit(family, seed, masks == "yes", root)
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    print("\n| family | masks | seeds | cue found (medium+) | clean: runs with a medium+ false alarm |")
    print("|---|---|---|---|---|")
    for family in args.families:
        for masks in args.masks:
            sub = [r for r in rows if r["family"] == family and r["masks"] == (masks == "yes")]
            found = "-" if family == "control" else f"{sum(bool(r['found']) for r in sub)}/{len(sub)}"
            alarms = f"{sum(bool(r['false_alarms']) for r in sub)}/{len(sub)}" if family == "control" else "-"
            print(f"| {family} | {masks} | {len(sub)} | {found} | {alarms} |")


if __name__ == "__main__":
    main()

"""``subset_cue``: a cue on part of a class, proposed by where the maps peak, confirmed on the images that carry it.

The planted ``subset`` scenario puts class b's object with a tag in the top-left corner on a fifth of class a's
images (the tag is then all that says a); the region scan's median over the class cannot see it. The ``decoy``
scenario puts the same tag on half of both classes' images, where it predicts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auditor import load_config, run_audit
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.registry import FlagContext
from auditor.shortcuts.subsets import localize, peaks, propose, subset_flags
from tests.shortcuts.planted import accuracy, make, train, write, write_config

T = Thresholds()


def test_peaks_are_the_smoothed_maximum_and_no_map_has_none() -> None:
    maps = np.zeros((3, 32, 32), np.float32)
    maps[0, 4:7, 6:9] = 0.5
    maps[0, 5, 7] = 1.0
    maps[1, 20:23, 10:13] = 1.0
    maps[1, 2, 2] = 1.5  # a single hot cell loses to a hot 3 x 3 patch after smoothing
    maps[2] = np.nan
    assert peaks(maps).tolist() == [[5, 7], [21, 11], [-1, -1]]


def _spread(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(6, 26, (n, 2))


def test_a_place_on_a_fifth_of_the_class_is_proposed_and_chance_clusters_are_not() -> None:
    rng = np.random.default_rng(0)
    own = np.concatenate([np.full((8, 2), 3), _spread(rng, 32)])
    place = propose(own, _spread(rng, 40), T, seed=1)
    assert place is not None and place["k"] == 8 and place["share"] == pytest.approx(0.2)
    assert abs(place["centre"][0] - 3) <= 1 and abs(place["centre"][1] - 3) <= 1 and place["p"] < T.alpha
    # no fixed place: objects spread over the image, whatever the seed of the shuffles
    assert all(propose(_spread(rng, 40), _spread(rng, 40), T, seed=s) is None for s in range(5))
    # a decoy: the tag on both classes' images draws both classes' maps alike
    decoy = np.concatenate([np.full((8, 2), 3), _spread(rng, 32)])
    assert propose(own, decoy, T, seed=1) is None
    # on most of the class it is the region scan's case, not a subset
    most = np.concatenate([np.full((36, 2), 3), _spread(rng, 4)])
    assert propose(most, _spread(rng, 40), T, seed=1) is None
    # too few images to test (a paired signed-rank test of 4 cannot reach p < 0.05)
    few = np.concatenate([np.full((4, 2), 3), _spread(rng, 36)])
    assert propose(few, _spread(rng, 40), T, seed=1) is None


def test_the_region_is_the_scan_peak_grown_by_one_stride() -> None:
    boxes = [[x, y, x + 0.125, y + 0.125] for y in np.arange(0, 0.5, 0.0625) for x in np.arange(0, 0.5, 0.0625)]
    drops = np.zeros((6, len(boxes)))
    hit = [i for i, b in enumerate(boxes) if b[0] <= 0.05 and b[1] <= 0.05]  # windows over a tag at [0, 0.05]
    drops[:, hit] = 0.9
    region = localize(drops, boxes, 0.0625)
    assert region[0] == 0.0 and region[1] == 0.0 and 0.15 <= region[2] <= 0.25 and 0.15 <= region[3] <= 0.25


def _measured(
    removal: float = 0.9,
    paste: float = 0.9,
    flips: float = 0.9,
    p: float = 1e-4,
    region: list[float] | None = None,
    on_object: float = float("nan"),
    inside: float = float("nan"),
) -> dict[str, Any]:
    test = {
        "removal_drop": removal,
        "paste_gain": paste,
        "paste_flips": flips,
        "control": {"region": [0.75, 0.75, 1.0, 1.0], "removal_drop": 0.0, "paste_gain": 0.0},
        "removal_effect": removal,
        "removal_p": p,
        "paste_effect": paste,
        "paste_p": p,
    }
    cue = {
        "centre": [3.0, 3.0], "share": 0.2, "other_share": 0.0, "k": 8, "n": 40, "p": 0.005, "lift": 8.0,
        "ids": [f"a_{i}" for i in range(8)], "region": region or [0.0, 0.0, 0.25, 0.25],
        "location": "the top-left corner", "test": test, "object_share": on_object, "object_inside": inside,
        "non_carriers": {"n": 16, "removal_drop": 0.0, "removal_effect": 0.0},
    }  # fmt: skip
    return {"subset_cues": {"a": cue}}


def _severity(m: dict[str, Any]) -> str | None:
    flags = subset_flags(m, FlagContext(T))
    return flags[0]["severity"] if flags else None


def test_the_subset_cue_rules() -> None:
    assert _severity(_measured()) == "high"
    assert _severity(_measured(paste=0.01, flips=0.0)) == "medium"  # the removal alone carries it
    assert _severity(_measured(removal=T.subset_effect - 0.01)) is None  # the carriers barely need the place
    assert _severity(_measured(removal=0.4, paste=0.3, flips=0.3)) == "medium"  # confirmed, short of high_effect
    assert _severity(_measured(p=0.3)) is None  # effects without significance
    assert _severity(_measured(on_object=0.8)) is None  # the carriers' objects are there: the object
    assert _severity(_measured(on_object=0.1)) == "high"
    # a region far larger than the objects: they cover little of it, but it holds most of the object in most
    # carriers (a clean six-class model's central region in a held-out benchmark run: object_share 0.5)
    assert _severity(_measured(region=[0.1, 0.1, 0.8, 0.7], on_object=0.5, inside=0.83)) is None
    assert _severity(_measured(on_object=0.1, inside=0.5)) == "high"  # half the carriers: not most
    assert _severity(_measured(region=[0.4, 0.4, 0.6, 0.6])) == "low"  # central, no masks: maybe the object
    assert _severity(_measured(region=[0.4, 0.4, 0.6, 0.6], on_object=0.1)) == "high"  # masks say it is not
    flag = subset_flags(_measured(), FlagContext(T))[0]
    assert "20% of the a images (8 of 40)" in flag["message"] and flag["evidence"]["ids"] == [
        f"a_{i}" for i in range(8)
    ]


def _audit(kind: str, rate: tuple[float, float], tmp: Path) -> list[dict[str, Any]]:
    model = train(make(kind, 80, 0, cue_rate=rate))
    assert accuracy(model, make(kind, 30, 5, cue_rate=rate)) > 0.95
    write(tmp, make(kind, 40, 1, cue_rate=rate), masks=False)
    torch.save(model.state_dict(), tmp / "model.pt")
    write_config(tmp)
    run_audit(load_config(tmp / "audit.yaml"), tmp / "run", progress=False)
    return json.loads((tmp / "run" / "flags.json").read_text())["flags"]


@pytest.mark.slow
def test_a_tag_on_a_fifth_of_a_class_is_found_without_masks_and_a_decoy_is_not(tmp_path: Path) -> None:
    flags = _audit("subset", (0.2, 0.0), tmp_path / "subset")
    found = [f for f in flags if f["kind"] == "subset_cue" and f["class"] == "a"]
    assert [f["severity"] for f in found] == ["high"], [f["message"] for f in flags]
    ev = found[0]["evidence"]
    assert ev["share"] == pytest.approx(0.2) and sorted(ev["ids"]) == [f"images/a_{i:04d}.png" for i in range(8)]
    x0, y0, x1, y1 = found[0]["region"]  # the tag covers [0.03, 0.19] on both axes
    assert x0 <= 0.03 and y0 <= 0.03 and 0.19 <= x1 <= 0.35 and 0.19 <= y1 <= 0.35
    assert ev["test"]["removal_effect"] > 0.5 and ev["non_carriers"]["removal_effect"] < 0.1
    decoy = _audit("decoy", (0.5, 0.5), tmp_path / "decoy")
    assert not [f for f in decoy if f["severity"] != "low"], [f["message"] for f in decoy]

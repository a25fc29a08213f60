"""The cost figures the README quotes are counted from the code, so they cannot drift from it again (it said
3 counterfactual forwards per image while the code ran 6, and 640 colour-shift forwards per class for 320)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.interventions import region_intervention, shift_intervention
from auditor.shortcuts.probes import VERSIONS

README = (Path(__file__).parents[1] / "README.md").read_text()


def _quoted(pattern: str) -> int:
    found = re.search(pattern, README.replace("\n", " "))
    assert found, f"the README no longer says {pattern!r}"
    return int(found.group(1))


def test_counterfactual_forwards_per_image() -> None:
    assert _quoted(r"Counterfactual probes \((\d+) forwards per image") == len(VERSIONS)


class Counting(nn.Module):
    """A two-class model that counts the images it forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)


def test_colour_shift_forwards_per_class() -> None:
    n = Thresholds().intervention_images
    model = Counting()
    images = torch.rand(2 * n, 3, 8, 8)
    shift_intervention(
        model,
        lambda rows: images[list(rows)],
        range(n),
        range(n, 2 * n),
        0,
        [0.1, 0.1, 0.1],
        to_pixels=lambda x: x,
        from_pixels=lambda x: x,
        keep=lambda rows: torch.zeros(len(rows), 8, 8, dtype=torch.bool),
    )
    assert _quoted(r"and (\d+) for the colour shifts") == sum(model.seen)


def test_region_confirmation_forwards() -> None:
    n = Thresholds().intervention_images
    model = Counting()
    images = torch.rand(2 * n, 3, 8, 8)
    region_intervention(
        model,
        lambda rows: images[list(rows)],
        range(n),
        range(n, 2 * n),
        0,
        [0.0, 0.0, 0.25, 0.25],
        [0.75, 0.75, 1.0, 1.0],
        to_pixels=lambda x: x,
        from_pixels=lambda x: x,
    )
    assert _quoted(r"hotspot candidate adds (\d+) for its confirmation") == sum(model.seen)


def test_the_band_box_scan_forwards() -> None:
    from auditor.shortcuts.cues import BOX
    from auditor.shortcuts.interventions import occlusion_scan
    from auditor.shortcuts.windows import grid_boxes

    model = Counting()
    n = Thresholds().cue_images
    occlusion_scan(model, torch.rand(n, 3, 8, 8), 0, grid_boxes(BOX, BOX / 2))
    assert _quoted(r"12 x (\d+) more where a band is the peak") * n == sum(model.seen)
    assert _quoted(r"the region scan \((\d+) images x") == n

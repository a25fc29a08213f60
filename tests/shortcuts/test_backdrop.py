"""The background graft (``backdrop_cue``): the intervention on a hand-made model with a known answer, and the
flag rule at its thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from auditor.shortcuts import backdrop
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.interventions import graft_intervention
from auditor.shortcuts.registry import FlagContext

S = 8
CENTRE = torch.zeros(S, S, dtype=torch.bool)
CENTRE[2:6, 2:6] = True  # every image's object: the central 4 x 4


class Reads(nn.Module):
    """Logit of class 0 = 8 x (mean green over ``where``) - 4; class 1's logit is 0."""

    def __init__(self, where: Tensor) -> None:
        super().__init__()
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        green = x[:, 1][:, self.where].mean(1)
        return torch.stack([8 * green - 4, torch.zeros_like(green)], 1)


def _images(n: int, background: float, obj: float) -> Tensor:
    x = torch.full((n, 3, S, S), background)
    x[:, :, CENTRE] = obj
    return x


OWN, OTHER = _images(6, 1.0, 0.0), _images(6, 0.0, 0.0)  # class 0: green backgrounds; class 1: black ones


def _load(rows: Sequence[int]) -> Tensor:
    return torch.cat([OWN, OTHER])[list(rows)]


def _keep(rows: Sequence[int]) -> Tensor:
    return CENTRE.expand(len(rows), S, S)


def test_a_model_that_reads_the_background_gains_from_the_class_backgrounds() -> None:
    model = Reads(~CENTRE)
    out = graft_intervention(model, _load, range(6), range(6, 12), 0, _keep)
    # recipients take a green background: logit 8 - 4 = 4, p = sigmoid(4); the null keeps them black: sigmoid(-4)
    expected = float(torch.sigmoid(torch.tensor(4.0)) - torch.sigmoid(torch.tensor(-4.0)))
    assert np.isclose(out["paste_effect"], expected, atol=1e-6) and out["paste_flips"] == 1.0
    assert out["null_flips"] == 0.0 and out["paste_p"] < 0.05
    assert np.isclose(out["removal_effect"], expected, atol=1e-6)  # the class's images on black backgrounds


def test_a_model_that_reads_the_object_gains_nothing() -> None:
    model = Reads(CENTRE)  # the object is kept in every graft: nothing the model reads moves
    out = graft_intervention(model, _load, range(6), range(6, 12), 0, _keep)
    assert out["paste_effect"] == 0.0 and out["removal_effect"] == 0.0 and out["paste_p"] == 1.0


def _measured(effect: float, flips: float, null: float, p: float, compact: float | None) -> dict[str, Any]:
    test = {"paste_effect": effect, "paste_flips": flips, "null_flips": null, "paste_p": p}
    test |= {"n_pasted": 32, "removal_effect": 0.0, "own_compact": compact}
    return {"backdrops": {"a": {"n": 32, "method": "layer_cam", "test": test}}}


def _severity(*args: Any) -> str | None:
    ctx = FlagContext(Thresholds())
    flags = backdrop.backdrop_flags(_measured(*args), ctx)
    return flags[0]["severity"] if flags else None


def test_the_flag_needs_an_effect_like_taking_the_class_away_and_a_majority_turned() -> None:
    assert _severity(0.6, 0.8, 0.1, 1e-4, 0.5) == "high"
    assert _severity(0.6, 0.8, 0.1, 1e-4, None) == "high"  # masks everywhere: no compactness to judge
    assert _severity(0.49, 0.9, 0.0, 1e-4, 0.5) is None  # under high_effect
    assert _severity(0.6, 0.6, 0.1, 1e-4, 0.5) is None  # half turned beyond the null: not a majority
    assert _severity(0.6, 0.8, 0.1, 0.2, 0.5) is None  # not significant
    # without masks, maps that point at one place: a large object may have come along
    assert _severity(0.6, 0.8, 0.1, 1e-4, backdrop.COMPACT) == "low"

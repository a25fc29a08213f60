"""The background graft (``backdrop_cue``): the intervention on a hand-made model with a known answer, and the
flag rule at its thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from auditor.shortcuts import backdrop
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.interventions import graft_intervention
from auditor.shortcuts.registry import AnalysisInputs, FlagContext
from tests.shortcuts.test_triage import _table

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
    assert out["removal_flips"] == 1.0 and out["removal_null_flips"] == 0.0 and out["removal_p"] < 0.05


def test_a_model_that_reads_the_object_gains_nothing() -> None:
    model = Reads(CENTRE)  # the object is kept in every graft: nothing the model reads moves
    out = graft_intervention(model, _load, range(6), range(6, 12), 0, _keep)
    assert out["paste_effect"] == 0.0 and out["removal_effect"] == 0.0 and out["paste_p"] == 1.0


_NO_REVERSE = {"removal_effect": 0.0, "removal_flips": 0.0, "removal_null_flips": 0.0, "removal_p": 1.0}
_NO_PASTE = {"paste_effect": 0.0, "paste_flips": 0.0, "null_flips": 0.0, "paste_p": 1.0}


def _measured(effect: float, flips: float, null: float, p: float, compact: float | None) -> dict[str, Any]:
    test = {"paste_effect": effect, "paste_flips": flips, "null_flips": null, "paste_p": p}
    test |= {"n_pasted": 32, "n_removed": 32, "own_compact": compact, "other_compact": None} | _NO_REVERSE
    return {"backdrops": {"a": {"n": 32, "method": "layer_cam", "test": test}}}


def _severity(*args: Any) -> str | None:
    ctx = FlagContext(Thresholds())
    flags = backdrop.backdrop_flags(_measured(*args), ctx)
    return flags[0]["severity"] if flags else None


def _reversed(effect: float, flips: float, null: float, p: float, compact: float | None) -> dict[str, Any]:
    """A class whose images lose it on other classes' backgrounds (the donors' maps' compactness ``compact``)."""
    test = {"removal_effect": effect, "removal_flips": flips, "removal_null_flips": null, "removal_p": p}
    test |= {"n_pasted": 32, "n_removed": 32, "own_compact": 0.5, "other_compact": compact} | _NO_PASTE
    return {"backdrops": {"b": {"n": 32, "method": "layer_cam", "test": test}}}


def _reverse_severity(*args: Any) -> str | None:
    flags = backdrop.backdrop_flags(_reversed(*args), FlagContext(Thresholds()))
    assert all(f["evidence"]["direction"] == "removal" for f in flags)
    return flags[0]["severity"] if flags else None


def test_the_reverse_flag_needs_the_class_taken_away_on_other_backgrounds_from_a_majority() -> None:
    assert _reverse_severity(0.6, 0.8, 0.1, 1e-4, 0.5) == "high"
    assert _reverse_severity(0.6, 0.8, 0.1, 1e-4, None) == "high"  # masks everywhere
    assert _reverse_severity(0.49, 0.9, 0.0, 1e-4, 0.5) is None  # under high_effect
    assert _reverse_severity(0.6, 0.6, 0.1, 1e-4, 0.5) is None  # half lost the class beyond the null
    assert _reverse_severity(0.6, 0.8, 0.1, 0.2, 0.5) is None  # not significant
    # without masks, the donors (other classes' images) have maps that point at one place: their large objects
    assert _reverse_severity(0.6, 0.8, 0.1, 1e-4, backdrop.COMPACT) == "low"


def test_a_class_whose_graft_and_reverse_both_stand_gets_one_flag() -> None:
    both = _measured(0.6, 0.8, 0.1, 1e-4, 0.5)
    both["backdrops"]["a"]["test"] |= {"removal_effect": 0.7, "removal_flips": 0.9, "removal_null_flips": 0.0}
    both["backdrops"]["a"]["test"]["removal_p"] = 1e-4
    flags = backdrop.backdrop_flags(both, FlagContext(Thresholds()))
    assert len(flags) == 1 and flags[0]["evidence"]["direction"] == "paste"


def test_the_flag_needs_an_effect_like_taking_the_class_away_and_a_majority_turned() -> None:
    assert _severity(0.6, 0.8, 0.1, 1e-4, 0.5) == "high"
    assert _severity(0.6, 0.8, 0.1, 1e-4, None) == "high"  # masks everywhere: no compactness to judge
    assert _severity(0.49, 0.9, 0.0, 1e-4, 0.5) is None  # under high_effect
    assert _severity(0.6, 0.6, 0.1, 1e-4, 0.5) is None  # half turned beyond the null: not a majority
    assert _severity(0.6, 0.8, 0.1, 0.2, 0.5) is None  # not significant
    # without masks, maps that point at one place: a large object may have come along
    assert _severity(0.6, 0.8, 0.1, 1e-4, backdrop.COMPACT) == "low"


class Grafter:
    """A model access whose images hold their class at one place (rows ``objects``: filling in a window over the
    point (0.6, 0.6) takes p(class) away) or everywhere (the others: no window matters). Its graft carries the
    class (effect 0.8: the graft's gain, or with ``reverse`` the reverse's loss) unless a later graft spares every
    object's windows. Records each graft's spared windows and the classes each scan reads."""

    def __init__(self, objects: set[int] | None = None, reverse: bool = False) -> None:
        self.objects, self.reverse = OBJECT if objects is None else objects, reverse
        self.grafts: list[dict[int, list[list[float]]] | None] = []
        self.read_as: list[Any] = []

    def scan(self, rows: Sequence[int], cls: Any, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        self.read_as.append(cls)
        over = np.array([b[0] <= 0.6 < b[2] and b[1] <= 0.6 < b[3] for b in boxes])
        return np.array([np.where(over, 0.9, 0.01) if r in self.objects else np.full(len(boxes), 0.02) for r in rows])

    def graft_test(
        self, own: Sequence[int], other: Sequence[int], cls: int, method: str | None, spare: Any = None
    ) -> dict[str, Any]:
        self.grafts.append(spare)
        carried = spare is None or not self.objects & set(spare)
        effect, flips = (0.8, 0.9) if carried else (0.1, 0.1)
        if self.reverse:
            test = {"removal_effect": effect, "removal_flips": flips, "removal_null_flips": 0.0, "removal_p": 1e-6}
            test |= _NO_PASTE | {"other_compact": 0.5}
        else:
            test = {"paste_effect": effect, "paste_flips": flips, "null_flips": 0.0, "paste_p": 1e-6}
            test |= _NO_REVERSE | {"other_compact": None}
        return test | {"n_pasted": len(other), "n_removed": len(own), "own_compact": None}


OBJECT = {0, 1, 2, 3}  # class a's images 0-3 hold an object the maps missed; 4-9 a texture


def _graft(objects: np.ndarray | None, grafter: Grafter | None = None) -> tuple[dict[str, Any], Grafter]:
    grafter = grafter or Grafter()
    run = SimpleNamespace(map_rows=lambda m, t: None, object_rows=lambda: objects)
    table = _table(0.9, 0.9, n=10)
    inputs = AnalysisInputs(table, "label", [], ["a", "b"], [], run, Thresholds(), intervener=grafter)  # type: ignore[arg-type]
    return backdrop._graft_class({}, inputs, "a")["backdrop"], grafter


def test_without_masks_the_windows_that_hold_the_class_in_an_image_are_found() -> None:
    run = SimpleNamespace(map_rows=lambda m, t: None, object_rows=lambda: None)
    inputs = AnalysisInputs(_table(0.9, 0.9), "label", [], ["a", "b"], [], run, Thresholds(), intervener=Grafter())  # type: ignore[arg-type]
    found = backdrop.model_objects(inputs, [0, 5], 0, 0.5)
    assert list(found) == [0]  # the texture image: no window takes the class away
    windows = [b for b in backdrop.object_windows() if b[0] <= 0.6 < b[2] and b[1] <= 0.6 < b[3]]
    assert sorted(found[0]) == sorted(windows) and len(windows) == 4  # half the side, half-overlapping
    assert backdrop.model_objects(inputs, [0, 5], 0, 0.95) == {}  # no window takes 0.95 away


def test_a_graft_that_carries_the_donors_objects_along_is_redone_sparing_them_and_not_flagged() -> None:
    entry, grafter = _graft(None)
    assert grafter.grafts[0] is None and set(grafter.grafts[1]) == OBJECT  # the second spares the objects
    assert entry["unspared"]["paste_effect"] == 0.8 and entry["test"]["paste_effect"] == 0.1
    assert (entry["spared_images"], entry["bare_images"]) == (4, 10)
    assert backdrop.backdrop_flags({"backdrops": {"a": entry}}, FlagContext(Thresholds())) == []


def test_with_masks_the_graft_runs_once() -> None:
    objects = np.zeros((20, 32, 32), np.float32)
    objects[:, 10:20, 10:20] = 1.0  # every image has a mask: it spares the object
    entry, grafter = _graft(objects)
    assert grafter.grafts == [None] and "unspared" not in entry
    assert backdrop.backdrop_flags({"backdrops": {"a": entry}}, FlagContext(Thresholds()))[0]["severity"] == "high"


DONOR_OBJECT = {10, 11, 12}  # class b's images 10-12 hold an object the maps missed


def _reverser() -> Grafter:
    """Class a's images lose a on class b's backgrounds while b's objects, which the maps missed in rows
    ``DONOR_OBJECT``, come along with them."""
    return Grafter(DONOR_OBJECT, reverse=True)


def test_a_reverse_that_carries_the_donors_objects_along_is_redone_sparing_them_and_not_flagged() -> None:
    entry, grafter = _graft(None, _reverser())
    assert grafter.grafts[0] is None and set(grafter.grafts[1]) == DONOR_OBJECT
    assert grafter.read_as == [[1] * 10]  # the donors' windows, each read for its own class, b
    assert entry["reverse_unspared"]["removal_effect"] == 0.8 and entry["test"]["removal_effect"] == 0.1
    assert (entry["donors_spared"], entry["bare_donors"]) == (3, 10)
    assert backdrop.backdrop_flags({"backdrops": {"a": entry}}, FlagContext(Thresholds())) == []


def test_with_masks_the_reverse_runs_once_and_stands() -> None:
    objects = np.zeros((20, 32, 32), np.float32)
    objects[:, 10:20, 10:20] = 1.0
    entry, grafter = _graft(objects, _reverser())
    assert grafter.grafts == [None] and "reverse_unspared" not in entry
    flags = backdrop.backdrop_flags({"backdrops": {"a": entry}}, FlagContext(Thresholds()))
    assert [(f["severity"], f["evidence"]["direction"]) for f in flags] == [("high", "removal")]


def test_a_class_reads_each_sides_map_compactness_once() -> None:
    """The graft is redone with the model-found objects (up to 3 grafts a class) on the same images: their maps'
    compactness is computed once per (rows, method)."""
    from auditor.run.access import ModelAccess

    access = ModelAccess.__new__(ModelAccess)  # no plan: only the cache is under test
    access._compact = {}
    calls: list[tuple[int, ...]] = []
    access._compactness = lambda rows, method: calls.append(tuple(rows)) or 0.5  # type: ignore[method-assign]
    assert access.compactness([3, 4], "grad_cam") == 0.5 and access.compactness((3, 4), "grad_cam") == 0.5
    assert calls == [(3, 4)]
    access.compactness([3, 4], None)
    access.compactness([5], "grad_cam")
    assert calls == [(3, 4), (3, 4), (5,)]

"""Every guard of the intervention verdicts on hand-made measurements, each triggered both ways.

The end-to-end scenarios saturate every threshold (the cue predicts 100%), so they never reach the guards;
these tests set each measured number just past and just short of its rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.counterfactual import counterfactual_flags
from auditor.shortcuts.cues import confirmation, control_box, cue_flags
from auditor.shortcuts.probes import counterfactuals
from auditor.shortcuts.properties import global_flags
from auditor.shortcuts.registry import FlagContext
from auditor.shortcuts.removals import counterfactual_summary, removed_gaps

T = Thresholds()
CTX = FlagContext(T)
CORNER = [0.0625, 0.75, 0.1875, 0.875]  # bottom-left, off the centre
CENTRE = [0.4, 0.4, 0.6, 0.6]


def _test(
    removal: float, paste: float, p: float = 0.001, control: tuple[float, float] = (0.0, 0.0), flips: float = 0.5
) -> dict[str, Any]:
    """A region test whose paired effects are its means minus the control box's (floored at 0)."""
    return {
        "n_removed": 20,
        "n_pasted": 32,
        "removal_drop": removal,
        "paste_gain": paste,
        "paste_flips": flips,
        "control": {"region": control_box(CORNER), "removal_drop": control[0], "paste_gain": control[1]},
        "removal_effect": removal - max(control[0], 0.0),
        "removal_p": p,
        "paste_effect": paste - max(control[1], 0.0),
        "paste_p": p,
    }


def _cue(region: list[float] | None = CORNER, overlap: float = float("nan"), **over: Any) -> dict[str, Any]:
    r = {
        "n": 12,
        "peak": 0.9,
        "baseline": 0.0,
        "effect": 0.9,
        "consistency": 1.0,
        "region": region,
        "location": "somewhere",
        "area": 0.02,
        "object_overlap": overlap,
        "ids": ["a"],
        "test": _test(0.8, 0.8),
        "held_out": True,
    }
    return r | over


def _severity(r: dict[str, Any]) -> str | None:
    flags = cue_flags({"cues": {"tagged": r}}, CTX)
    return flags[0]["severity"] if flags else None


def test_region_cue_high_needs_removal_and_paste_beyond_the_control() -> None:
    assert _severity(_cue()) == "high"
    assert _severity(_cue(test=_test(0.8, 0.0))) == "medium"  # removal without paste
    assert _severity(_cue(test=_test(0.0, 0.8))) is None  # paste without removal: a combination, not the region
    # the control box moves as much: the effect over it is what counts
    ctrl = _cue(test=_test(0.8, 0.8, control=(0.78, 0.0)))
    assert _severity(ctrl) is None
    q = {"removal/tagged": 0.001, "paste/tagged": 0.001}
    assert confirmation("tagged", ctrl, T, q)["removal_effect"] == pytest.approx(0.02)
    # just past and just short of intervention_effect; a p-value alone never confirms
    e = T.intervention_effect
    assert _severity(_cue(test=_test(e + 0.01, e + 0.01))) == "high"
    assert _severity(_cue(test=_test(e - 0.01, e + 0.01))) is None
    assert _severity(_cue(test=_test(0.8, 0.8, p=0.2))) is None


def test_region_cue_scan_effect_and_image_count_guards() -> None:
    assert _severity(_cue(effect=T.cue_drop - 0.01)) is None  # the scan's peak does not beat the baseline
    assert _severity(_cue(n=3)) is None  # too few images to call a place common to a class
    assert _severity(_cue(region=None)) is None  # the scan localized nothing


def test_region_cue_confirmed_on_the_scanned_images_is_low_and_says_so() -> None:
    # a class too small to hold images out: the place was tested on the images it was chosen on (selection)
    assert _severity(_cue(held_out=False)) == "low"
    msg = cue_flags({"cues": {"tagged": _cue(held_out=False)}}, CTX)[0]["message"]
    assert "tested on the images it was chosen on" in msg
    assert "20 other tagged images" in cue_flags({"cues": {"tagged": _cue()}}, CTX)[0]["message"]


def test_region_cue_on_the_object_and_central_guards() -> None:
    # with masks: a region mostly on the objects is the object, not a cue
    assert _severity(_cue(overlap=T.hotspot_object_overlap + 0.1)) is None
    assert _severity(_cue(overlap=T.hotspot_object_overlap - 0.1)) == "high"
    # without masks a central region may be the object itself: low (no false alarm on centred objects), said so
    assert _severity(_cue(region=CENTRE)) == "low"
    msg = cue_flags({"cues": {"tagged": _cue(region=CENTRE)}}, CTX)[0]["message"]
    assert "without masks it may be the object itself" in msg
    # with masks showing it off the objects, a central region keeps its severity
    assert _severity(_cue(region=CENTRE, overlap=0.1)) == "high"


def test_region_cue_high_needs_an_effect_comparable_to_taking_the_class_away() -> None:
    h = T.high_effect
    assert _severity(_cue(test=_test(0.2, 0.2, flips=0.1))) == "medium"  # confirmed both ways, but small
    assert _severity(_cue(test=_test(h, 0.2, flips=0.1))) == "high"  # the removal takes the class away
    assert _severity(_cue(test=_test(0.2, h, flips=0.1))) == "high"  # the transplant brings it in
    assert _severity(_cue(test=_test(0.2, 0.2, flips=h))) == "high"  # a majority of other images turned
    assert _severity(_cue(test=_test(0.2, 0.2, flips=h - 0.01))) == "medium"


def test_region_cue_holding_the_object_in_most_images_is_the_object() -> None:
    # a large region that is mostly background can still hold the whole object in most images
    assert _severity(_cue(overlap=0.1, object_inside=0.8)) is None
    assert _severity(_cue(overlap=0.1, object_inside=0.3)) == "high"


def test_bands_along_the_edges_are_not_central() -> None:
    from auditor.shortcuts.windows import edge_bands, grow

    top, bottom, left, right = edge_bands(0.25)
    assert left == [0.0, 0.0, 0.25, 1.0]
    assert top == [0.0, 0.0, 1.0, 0.25] and bottom == [0.0, 0.75, 1.0, 1.0] and right == [0.75, 0.0, 1.0, 1.0]
    sky = [0.0, 0.0, 1.0, 0.375]  # a sky band spans the width, so it touches the centre's ninth
    assert _severity(_cue(region=sky)) == "high"  # but its middle line is in the top third
    assert _severity(_cue(region=[0.0, 0.35, 1.0, 0.65])) == "low"  # a band across the middle is central
    assert grow([0.05, 0.9, 0.2, 1.0], 0.1) == pytest.approx([0.0, 0.8, 0.3, 1.0])


def test_object_inside_is_the_share_of_images_whose_object_lies_mostly_in_the_region() -> None:
    import numpy as np

    from auditor.shortcuts.grids import box_cells, object_inside

    objects = np.zeros((4, 32, 32), np.float32)
    objects[0, 10:14, 10:14] = 1  # inside
    objects[1, 12:16, 12:16] = 1  # inside
    objects[2, 0:4, 0:4] = 1  # outside
    objects[3] = np.nan  # no mask
    cells = box_cells([0.25, 0.25, 0.75, 0.75])
    assert object_inside(objects, np.arange(4), cells) == pytest.approx(2 / 3)
    assert np.isnan(object_inside(None, np.arange(4), cells))


def test_the_control_box_is_the_mirror_image_or_the_far_corner() -> None:
    assert control_box([0.0, 0.75, 0.25, 1.0]) == [0.75, 0.0, 1.0, 0.25]
    far = control_box([0.4, 0.45, 0.6, 0.65])  # its mirror would overlap it: the corner away from its centre
    assert far == pytest.approx([0.0, 0.0, 0.2, 0.2])


def _shift(leave: float, flip: float, n: int = 30, p: float = 0.001) -> dict[str, Any]:
    return {
        "n_own": n,
        "n_other": n,
        "leave": leave,
        "leave_control": 0.0,
        "leave_p": p,
        "flip": flip,
        "flip_control": 0.0,
        "flip_p": p,
        "kept": 0.2,
    }


def _global(whole: dict[str, Any], outside: dict[str, Any] | None, gap: float | None = None) -> dict[str, Any]:
    test = {"whole": whole, "outside": outside}
    r = {"delta": [0.2, 0.0, -0.2], "n": 30, "property": "colour", "size": 0.2, "test": test}
    m: dict[str, Any] = {"global": {"dusk": r}}
    if gap is not None:
        m["global_removed_gap"] = {"dusk": gap}
    return m


def _gsev(m: dict[str, Any]) -> str | None:
    flags = global_flags(copy.deepcopy(m), CTX)
    return flags[0]["severity"] if flags else None


def test_global_cue_severity_follows_the_whole_image_effect() -> None:
    assert _gsev(_global(_shift(0.9, 0.9), _shift(0.6, 0.6))) == "high"
    assert _gsev(_global(_shift(0.4, 0.9), _shift(0.4, 0.4))) == "medium"  # min(leave, flip) < property_high
    assert _gsev(_global(_shift(0.2, 0.9), _shift(0.6, 0.6))) is None  # under property_effect


def test_global_cue_needs_the_shift_sparing_the_objects() -> None:
    # a model that reads the object's own colour follows the whole-image shift, not the spared one
    assert _gsev(_global(_shift(0.9, 0.9), _shift(0.9, 0.1))) is None
    assert _gsev(_global(_shift(0.9, 0.9), _shift(0.3, 0.3))) == "high"


def test_global_cue_with_masks_needs_the_class_to_survive_the_objects_removal() -> None:
    # masks: where the class goes with its object removed, the model is sensitive to colour, not led by it
    assert _gsev(_global(_shift(0.9, 0.9), _shift(0.6, 0.6), gap=T.counterfactual_gap - 0.05)) is None
    assert _gsev(_global(_shift(0.9, 0.9), _shift(0.6, 0.6), gap=T.counterfactual_gap + 0.05)) == "high"


def test_global_cue_needs_enough_images_and_significance() -> None:
    assert _gsev(_global(_shift(0.9, 0.9, n=T.min_group - 1), _shift(0.6, 0.6))) is None
    assert _gsev(_global(_shift(0.9, 0.9, p=0.2), _shift(0.6, 0.6, p=0.2))) is None


def _cf_rows(kept: dict[str, float], survives: tuple[str, ...]) -> pd.DataFrame:
    """10 images of class a and 10 of b, all recognised; a's images keep class a under the removal versions in
    ``survives`` (b's never become a); every version leaves the share ``kept[version]`` of the image."""
    rows = []
    for i in range(20):
        label = "a" if i < 10 else "b"
        row: dict[str, Any] = {"id": str(i), "label": label, "pred": label, "correct": True, "cf_fg_pred": label}
        for v in ("bg", "bg_margin", "bg_box", "bg_flat"):
            row[f"cf_{v}_pred"] = label if (label == "b" or v in survives) else "b"
            row[f"cf_{v}_kept"] = kept[v]
        row |= {"cf_mix_pred": label, "cf_mix_bg_label": "b" if label == "a" else "a"}
        rows.append(row)
    return pd.DataFrame(rows)


SMALL = {"bg": 0.9, "bg_margin": 0.8, "bg_box": 0.7, "bg_flat": 0.8}
LARGE = {"bg": 0.5, "bg_margin": 0.3, "bg_box": 0.01, "bg_flat": 0.3}  # an object covering ~half the frame
HUGE = {"bg": 0.2, "bg_margin": 0.05, "bg_box": 0.0, "bg_flat": 0.05}  # ~80% of the frame


def _cf_flags(rows: pd.DataFrame) -> list[str]:
    """The classes flagged, of those whose background is tested (a; b's images always keep b)."""
    flags = counterfactual_flags({"counterfactual": counterfactual_summary(rows, ["a", "b"])}, CTX)
    return [f["class"] for f in flags if f["class"] == "a"]


def test_a_removal_that_leaves_too_little_image_does_not_decide() -> None:
    # the background carries class a: the class survives every removal that leaves image to carry it
    every = ("bg", "bg_margin", "bg_box", "bg_flat")
    assert _cf_flags(_cf_rows(SMALL, every)) == ["a"]
    # a large object's box removal takes ~all of the image: the class goes with it, whatever the model uses;
    # it once decided (the weakest version) and the cue went unflagged because masks were given
    summary = counterfactual_summary(_cf_rows(LARGE, ("bg", "bg_margin", "bg_flat")), ["a", "b"])["a"]
    assert summary["usable"] == ["bg_margin", "bg_flat"] and summary["weakest"] in ("bg_margin", "bg_flat")
    assert _cf_flags(_cf_rows(LARGE, ("bg", "bg_margin", "bg_flat"))) == ["a"]
    # the guard is no free pass: a usable removal under which the class goes still clears the class
    assert _cf_flags(_cf_rows(LARGE, ("bg", "bg_margin"))) == []
    # with a small object the box is usable and decides as before
    assert _cf_flags(_cf_rows(SMALL, ("bg", "bg_margin", "bg_flat"))) == []


def test_a_class_whose_removals_all_leave_too_little_is_not_measured_and_vetoes_nothing() -> None:
    rows = _cf_rows(HUGE, ())  # every removal "removes the class": the image is gone, not the cue
    summary = counterfactual_summary(rows, ["a", "b"])
    assert summary["a"]["measurable"] is False and summary["a"]["usable"] == []
    assert _cf_flags(rows) == []
    assert removed_gaps(summary) == {}
    # so a colour cue found by the shifts stands (with a measurable removal that loses the class it would not)
    m = _global(_shift(0.9, 0.9), _shift(0.6, 0.6))
    m["global_removed_gap"] = removed_gaps(summary)
    assert _gsev(m) == "high"
    m["global"] = {"a": m["global"].pop("dusk")}
    m["global_removed_gap"] = removed_gaps(counterfactual_summary(_cf_rows(SMALL, ()), ["a", "b"]))
    assert _gsev(m) is None


def test_the_counterfactual_probes_measure_what_each_removal_leaves() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 20 * 20, 2)).eval()
    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[0, 2:18, 2:18] = True  # 64% of the frame
    masks[1, 8:12, 8:12] = True  # 4%
    out = counterfactuals(
        model, torch.randn(2, 3, 20, 20), masks, torch.tensor([0, 1]), torch.tensor([True, True]), None
    )
    assert out["cf_bg_kept"].tolist() == pytest.approx([1 - 0.64, 1 - 0.04])
    assert (
        out["cf_bg_box_kept"][0] == 0.0 and 0 < out["cf_bg_margin_kept"][1] < 0.96
    )  # the margin's box: the whole frame


def _covering_test(cue: list[float]) -> Callable[[list[float]], dict[str, Any]]:
    """A fake region test: removing a box takes p(class) away by the share of ``cue`` it covers."""

    def test(box: list[float]) -> dict[str, Any]:
        w = max(0.0, min(box[2], cue[2]) - max(box[0], cue[0]))
        h = max(0.0, min(box[3], cue[3]) - max(box[1], cue[1]))
        covered = w * h / ((cue[2] - cue[0]) * (cue[3] - cue[1]))
        return {"removal_drop": covered, "removal_effect": covered - 0.01 * (box[2] - box[0])}

    return test


def test_the_region_is_the_tightest_that_reproduces_the_scan() -> None:
    from auditor.shortcuts.cues import reproduce

    tag = [0.1, 0.8, 0.2, 0.9]
    # the located region is the tag: kept as it is, one test
    calls: list[list[float]] = []
    fake = _covering_test(tag)
    region, test = reproduce(tag, 1.0, 0.0625, lambda b: calls.append(b) or fake(b))
    assert region == tag and len(calls) == 1 and test["removal_drop"] == pytest.approx(1.0)
    # the grid's edge fell inside the tag (49% removed): grown by a stride (64%), then by two (81%): kept
    inner = [0.13, 0.83, 0.2, 0.9]
    calls.clear()
    region, test = reproduce(inner, 1.0, 0.01, lambda b: calls.append(b) or fake(b))
    assert len(calls) == 3 and region == pytest.approx([0.11, 0.81, 0.22, 0.92])
    assert test["removal_drop"] == pytest.approx(0.81)
    # nothing reproduces (the scan's drop came from a combination): the first growth uncovers nothing, so it
    # stops there, with the largest removal effect
    calls.clear()
    region, test = reproduce([0.5, 0.5, 0.52, 0.52], 1.0, 0.0625, lambda b: calls.append(b) or fake(b))
    assert len(calls) == 2 and region == [0.5, 0.5, 0.52, 0.52] and test["removal_drop"] == 0.0
    # a region the removal moves a little more at each step (an object, not a sliver): all four, the largest kept
    slow = lambda b: {"removal_drop": 0.3 + b[2] - 0.52, "removal_effect": 0.3 + b[2] - 0.52}  # noqa: E731
    calls.clear()
    region, test = reproduce([0.5, 0.5, 0.52, 0.52], 1.0, 0.15, lambda b: calls.append(b) or slow(b))
    assert len(calls) == 4 and region == pytest.approx([0.0, 0.0, 1.0, 1.0]) and test["removal_drop"] < 0.8


def test_a_band_region_reaches_the_edge_it_lies_along() -> None:
    from auditor.shortcuts.windows import anchor

    # a sky: the refined band stopped 1/8 short of the top edge, where a strip of sky would refill the rest
    assert anchor([0.0, 0.125, 1.0, 0.375], [0.0, 0.0, 1.0, 0.5]) == [0.0, 0.0, 1.0, 0.375]
    assert anchor([0.0, 0.7, 1.0, 0.9], [0.0, 0.75, 1.0, 1.0]) == [0.0, 0.7, 1.0, 1.0]  # the ground
    assert anchor([0.8, 0.0, 0.95, 1.0], [0.75, 0.0, 1.0, 1.0]) == [0.8, 0.0, 1.0, 1.0]  # a bar on the right


class _BoxScanner:
    """Drops of the half-side boxes: ``held`` for the box ``[0, 0, 0.5, 0.5]``, 0.05 elsewhere; counts calls."""

    def __init__(self, held: float) -> None:
        self.held, self.calls = held, 0

    def scan(self, rows: Sequence[int], cls: int, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        self.calls += 1
        row = [self.held if list(b) == [0.0, 0.0, 0.5, 0.5] else 0.05 for b in boxes]
        return np.array([row] * len(rows))


def _coarse(band: float, window: float) -> tuple[np.ndarray, list[list[float]], int]:
    """A coarse scan of 4 images: the left band half the image deep drops ``band``, the grid window at the top-left
    corner ``window``, every other place 0.02."""
    from auditor.shortcuts.windows import edge_bands, grid_boxes

    grid = grid_boxes(0.25, 0.125)
    coarse = grid + edge_bands(0.25) + edge_bands(0.5)
    row = np.full(len(coarse), 0.02)
    row[coarse.index([0.0, 0.0, 0.5, 1.0])] = band
    row[coarse.index([0.0, 0.0, 0.25, 0.25])] = window
    return np.tile(row, (4, 1)), coarse, len(grid)


@pytest.mark.parametrize(
    ("window", "box", "peak", "scans"),
    [
        (0.95, 0.95, [0.0, 0.0, 0.25, 0.25], 0),  # a tag in the corner: its grid window holds the band's drop
        (0.5, 0.95, [0.0, 0.0, 0.5, 0.5], 1),  # an object by the edge: no window holds it, a half-side box does
        (0.5, 0.85, [0.0, 0.0, 0.5, 1.0], 1),  # a sky: half of it leaves the class (0.85 < 90% of 1.0)
    ],
)
def test_a_band_is_the_peak_only_where_no_box_holds_its_drop(
    window: float, box: float, peak: list[float], scans: int
) -> None:
    from types import SimpleNamespace

    from auditor.shortcuts.cues import _peak

    scanner = _BoxScanner(box)
    drops, coarse, n_grid = _coarse(1.0, window)
    inputs = SimpleNamespace(intervener=scanner, thresholds=T)
    found = _peak(inputs, [0, 1, 2, 3], 0, drops, coarse, n_grid)  # type: ignore[arg-type]
    assert found["peak_box"] == peak and scanner.calls == scans
    if peak == [0.0, 0.0, 0.5, 0.5]:
        assert found["band_peak"] == 1.0 and found["band_box"] == [0.0, 0.0, 0.5, 1.0]
    if peak == [0.0, 0.0, 0.5, 1.0]:
        assert found["box_peak"] == pytest.approx(0.85)


def test_a_peak_that_is_no_band_scans_no_box() -> None:
    from types import SimpleNamespace

    from auditor.shortcuts.cues import _peak

    scanner = _BoxScanner(0.95)
    drops, coarse, n_grid = _coarse(0.3, 0.9)
    found = _peak(SimpleNamespace(intervener=scanner, thresholds=T), [0, 1, 2, 3], 0, drops, coarse, n_grid)  # type: ignore[arg-type]
    assert found["peak_box"] == [0.0, 0.0, 0.25, 0.25] and scanner.calls == 0

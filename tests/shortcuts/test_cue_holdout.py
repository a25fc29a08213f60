"""The region cue is confirmed on images its scan did not see.

The scan picks the best of ~60 places on its images; on those same images the place beats its control box by
selection alone (73 clean classes of a 100-class benchmark were flagged that way). Oracles: the split of a class
into scanned and held-out images, and the rows each call of a recording stand-in sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from auditor.shortcuts import cues
from auditor.shortcuts.cues import HELD_OUT, scan_split
from auditor.shortcuts.registry import intervene_here
from tests.shortcuts.test_triage import Recorder, _inputs, _table


@pytest.mark.parametrize(
    ("n", "split"),
    [
        (40, (12, 28)),
        (24, (12, 12)),
        (20, (10, 10)),
        (17, (8, 9)),
        (13, (6, 7)),
        (10, (4, 6)),
        (9, (9, 0)),
        (4, (4, 0)),
        (3, (3, 0)),
    ],
)
def test_a_class_is_split_into_scanned_and_held_out_images(n: int, split: tuple[int, int]) -> None:
    assert scan_split(n, 12) == split
    assert scan_split(n, 0) == (0, n)  # the scan off: nothing scanned


class OwnRecorder(Recorder):
    """The recorder, keeping the class's own images of each region test apart from the other classes'."""

    def region_test(self, own: Sequence[int], other: Sequence[int], *args: Any) -> dict[str, Any]:
        out = super().region_test(own, other, *args)
        self.calls[-1] = ("region", list(own))
        return out


def _calls(n: int) -> tuple[list[int], list[list[int]], dict[str, Any]]:
    rec = OwnRecorder(drop=0.5, removal=0.5)
    out = intervene_here(cues.WORK, {"cues": {}}, _inputs(_table(0.9, 0.9, n=n), rec, triage=False))
    a_rows = set(range(n))  # class a's rows come first in the table
    scans = [set(r) for k, r in rec.calls if k == "scan" and set(r) <= a_rows]
    tests = [r for k, r in rec.calls if k == "region" and set(r) <= a_rows]
    return sorted(set().union(*scans)), tests, out["cues"]["a"]


@pytest.mark.parametrize("n", [20, 10])
def test_the_region_is_confirmed_on_images_the_scan_did_not_see(n: int) -> None:
    scanned, tests, found = _calls(n)
    assert len(scanned) == scan_split(n, 12)[0]
    assert tests and all(not set(t) & set(scanned) for t in tests)  # coarse, fine and every region test
    assert all(len(t) == n - len(scanned) for t in tests) and found["held_out"] is True


def test_a_class_too_small_to_hold_images_out_is_tested_on_them_and_says_so() -> None:
    scanned, tests, found = _calls(HELD_OUT + 3)
    assert len(scanned) == HELD_OUT + 3 and all(sorted(t) == scanned for t in tests)
    assert found["held_out"] is False


def test_the_confirmation_holds_at_least_as_many_images_as_the_scan() -> None:
    # its least p-value on k images is 2^-k: 8 held out against 12 scanned (0.004) failed a 157-test BH family
    for n in range(4 + HELD_OUT, 200):
        scanned, held = scan_split(n, 12)
        assert held >= scanned >= 4 and scanned + held == n, n


class PairRecorder(Recorder):
    """The recorder, keeping each region test's class images and other images apart."""

    def __init__(self, **kw: float) -> None:
        super().__init__(**kw)
        self.region_calls: list[tuple[list[int], list[int]]] = []

    def region_test(self, own: Sequence[int], other: Sequence[int], *args: Any) -> dict[str, Any]:
        self.region_calls.append((list(own), list(other)))
        return super().region_test(own, other, *args)


@pytest.mark.parametrize(("removal", "pasted"), [(0.0, False), (0.5, True)])
def test_the_transplant_runs_only_where_the_removal_can_carry_a_flag(removal: float, pasted: bool) -> None:
    # a region_cue of any severity needs the removal's effect to reach intervention_effect (0.05): the growth
    # steps remove only, and the transplant (32 other images, 3 forwards each) runs on the final region if it does
    rec = PairRecorder(drop=0.5, removal=removal)
    out = intervene_here(cues.WORK, {"cues": {}}, _inputs(_table(0.9, 0.9, n=20), rec, triage=True))
    mine = [(own, other) for own, other in rec.region_calls if set(own) <= set(range(20))]  # class a's tests
    assert mine and all(other == [] for _, other in mine[:-1])
    assert bool(mine[-1][1]) is pasted and ("transplant" in out["cues"]["a"]) is not pasted
    rec = PairRecorder(drop=0.5, removal=removal)  # the triage off: every test transplants as well
    intervene_here(cues.WORK, {"cues": {}}, _inputs(_table(0.9, 0.9, n=20), rec, triage=False))
    assert all(other for own, other in rec.region_calls)

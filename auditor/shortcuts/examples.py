"""The intervention images a finding shows: which images, and which interventions (no torch).

The most convincing evidence of a shortcut is the intervention itself: the tag removed and the class gone,
the tag pasted into another class's image and the class appearing, the object removed and the class still
called. An analysis's ``examples`` hook (``Analysis.examples``) chooses them for the findings its flags
lead; the run stage (:mod:`auditor.run.examples`) carries them out through an :class:`ExampleMaker` and
saves the image pairs, so ``auditor report`` re-renders without the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import pandas as pd

from auditor.shortcuts.findings import Example, Finding
from auditor.shortcuts.flags import Flag

Region = Sequence[float] | Sequence[Sequence[float]]  # one normalized box, or a union of boxes


class ExampleMaker(Protocol):
    """One intervention on one image, forwarded before and after and saved (``run.examples``); None where the
    image cannot be loaded (or, for :meth:`remove_object`, has no mask)."""

    def remove_region(self, row: int, cls: str, region: Region, what: str = "region removed") -> Example | None:
        """The region inpainted from its surroundings."""
        ...

    def paste_region(
        self, row: int, donor: int, cls: str, region: Region, what: str = "region pasted"
    ) -> Example | None:
        """The region of image ``donor`` pasted into image ``row`` at the same place."""
        ...

    def remove_object(self, row: int, cls: str) -> Example | None:
        """The object, grown by a margin, inpainted from its surroundings."""
        ...

    def shift_colour(self, row: int, cls: str, delta: Sequence[float], sign: float, what: str) -> Example | None:
        """The image's colour shifted by ``sign * delta`` (pixel space, per channel)."""
        ...


def example_rows(first: pd.DataFrame, cls: str, ids: Sequence[str], own: bool, n: int) -> list[int]:
    """Rows of the class's (or, ``own`` False, other classes') samples: images the model gets right first (an
    intervention on a misclassified image shows nothing), then the ids the finding's evidence cites, then
    by id."""
    sub = first[(first["label"] == cls) == own]
    cited = sub[sub["id"].isin(ids)]
    rest = sub[~sub["id"].isin(ids)].sort_values("id")
    both = pd.concat([cited, rest]).sort_values("correct", ascending=False, kind="stable").head(n)
    return [int(r) for r in both["row"]]


def region_examples(
    finding: Finding,
    region: Region,
    first: pd.DataFrame,
    ids: Sequence[str],
    maker: ExampleMaker,
    n: int,
    name: str = "region",
) -> list[Example]:
    """The region removed from ``n - 1`` of the class's images, and pasted from the first into one other image."""
    cls = finding["classes"][0]
    out: list[Example] = []
    donors = []
    for row in example_rows(first, cls, ids, True, n - 1):
        ex = maker.remove_region(row, cls, region, f"{name} removed")
        if ex is not None:
            out.append(ex)
            donors.append(row)
    for row in example_rows(first, cls, [], False, 1) if donors else []:
        ex = maker.paste_region(row, donors[0], cls, region, f"{name} pasted")
        if ex is not None:
            out.append(ex)
    return out


def object_examples(
    finding: Finding, first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """Each class's object removed (with a margin) from about ``n / classes`` of its images that have a mask."""
    out: list[Example] = []
    per_class = max(1, n // max(len(finding["classes"]), 1))
    for cls in finding["classes"]:
        mine = 0
        for row in example_rows(first, cls, ids, True, 4 * n):
            if mine >= per_class:
                break
            ex = maker.remove_object(row, cls)
            if ex is not None:
                out.append(ex)
                mine += 1
    return out


def shift_examples(
    finding: Finding, delta: Sequence[float], first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """The class's images shifted toward the other classes' colour, and one other image shifted toward its."""
    cls = finding["classes"][0]
    out: list[Example] = []
    for own, sign, what in ((True, 1.0, "colour shifted away"), (False, -1.0, "colour shifted toward")):
        for row in example_rows(first, cls, ids, own, n - 1 if own else 1):
            ex = maker.shift_colour(row, cls, delta, sign, what)
            if ex is not None:
                out.append(ex)
    return out


ExamplesHook = Callable[[Finding, Mapping[str, Flag], pd.DataFrame, Sequence[str], ExampleMaker, int], list[Example]]
"""``examples(finding, flags by id, first, cited ids, maker, n) -> examples``: an analysis's choice of intervention
images for a finding its flags lead (``Analysis.examples``)."""


def finding_region_examples(
    finding: Finding, flags: Mapping[str, Flag], first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """The hook of the analyses that locate a region (``region_cue``, ``spatial_hotspot``): the finding's region
    removed from the class's images and pasted into another's."""
    return region_examples(finding, finding["region"], first, ids, maker, n) if finding["region"] else []


def object_removed_examples(
    finding: Finding, flags: Mapping[str, Flag], first: pd.DataFrame, ids: Sequence[str], maker: ExampleMaker, n: int
) -> list[Example]:
    """The hook of the background analyses: each class's object removed (with a margin), what the model calls
    without it."""
    return object_examples(finding, first, ids, maker, n)

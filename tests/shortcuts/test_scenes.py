"""The planted scenes' ``bare`` rendering: the same scenes without their cue, which the detection benchmark uses
to measure whether a model depends on a cue. Oracles: where each cue is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from tests.shortcuts.planted import FIXED, SIZE, make, make_many


def _changed(kind: str, **kw: object) -> list[np.ndarray]:
    cued, bare = make(kind, 6, 3, **kw), make(kind, 6, 3, bare=True, **kw)  # type: ignore[arg-type]
    for c, b in zip(cued, bare, strict=True):
        assert c["id"] == b["id"] and c["label"] == b["label"] and c["cue"] == b["cue"]
        assert np.array_equal(c["mask"], b["mask"])  # the same scene: the draws stay in step
    return [np.any(np.asarray(c["image"]) != np.asarray(b["image"]), axis=2) for c, b in zip(cued, bare, strict=True)]


@pytest.mark.parametrize("kind", ["stamp", "subset", "decoy"])
def test_bare_leaves_the_tag_out_and_nothing_else(kind: str) -> None:
    cued = make(kind, 6, 3, cue_rate=(0.5, 0.5))
    for s, diff in zip(cued, _changed(kind, cue_rate=(0.5, 0.5)), strict=True):
        outside = diff.copy()
        outside[1:6, 1:6] = False
        assert not outside.any()
        assert diff[1:6, 1:6].any() == s["cue"]  # the white tag is gone exactly where it was drawn


def test_bare_leaves_the_sky_band_out_of_every_image() -> None:
    for diff in _changed("sky", cue_rate=(1.0, 0.0)):
        rows = np.flatnonzero(diff.any(axis=1))
        assert rows.min() == 0 and rows.max() < round(SIZE * 0.35)  # the top 22-35% only


def test_bare_puts_the_texture_objects_on_gravel() -> None:
    cued, bare = make("texture", 6, 3), make("texture", 6, 3, bare=True)
    for c, b in zip(cued, bare, strict=True):
        m = np.asarray(c["mask"])
        assert np.array_equal(np.asarray(c["image"])[m], np.asarray(b["image"])[m])  # the same object
        assert np.any(np.asarray(c["image"])[~m] != np.asarray(b["image"])[~m])  # another ground


def test_bare_many_leaves_c0s_tag_out() -> None:
    cued, bare = make_many(4, 2, cue_rate=0.5), make_many(4, 2, cue_rate=0.5, bare=True)
    for c, b in zip(cued, bare, strict=True):
        assert np.any(np.asarray(c["image"]) != np.asarray(b["image"])) == c["cue"]


def test_fixed_objects_sit_at_one_place() -> None:
    for s in make("fixed", 6, 3):
        ys, xs = np.nonzero(np.asarray(s["mask"]))
        assert abs(ys.mean() - FIXED[0]) <= 1.5 and abs(xs.mean() - FIXED[1]) <= 1.5


@pytest.mark.parametrize("kind", ["sky-decoy", "cast-decoy"])
def test_decoys_are_on_the_stated_share_of_each_class(kind: str) -> None:
    scenes = make(kind, 6, 3, cue_rate=(0.5, 0.5))
    for cls in ("a", "b"):
        assert sum(bool(s["cue"]) for s in scenes if s["label"] == cls) == 3
    for s, diff in zip(scenes, _changed(kind, cue_rate=(0.5, 0.5)), strict=True):
        assert diff.any() == (kind == "sky-decoy" or bool(s["cue"]))  # a sky band on every image, a cast on half

"""The DFF concept analysis on activations whose concepts are known: an object channel, a background texture
shared by every class, and (in the shortcut case) a corner tag channel that only the class has."""

from __future__ import annotations

import numpy as np

from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.concepts import class_concepts, concept_flags
from auditor.shortcuts.registry import FlagContext


def _scene(rng: np.random.Generator, n: int, tag: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 3, 8, 8]`` activations and ``[n, 32, 32]`` object masks: object (ch 0), texture (ch 1), tag (ch 2)."""
    acts = np.zeros((n, 3, 8, 8))
    objects = np.zeros((n, 32, 32))
    for i in range(n):
        y, x = rng.integers(2, 6, 2)
        acts[i, 0, y - 1 : y + 1, x - 1 : x + 1] = rng.uniform(2, 3)
        objects[i, 4 * (y - 1) : 4 * (y + 1), 4 * (x - 1) : 4 * (x + 1)] = 1
        acts[i, 1] = rng.uniform(0.5, 1.0, (8, 8)) * (acts[i, 0] == 0)
        if tag:
            acts[i, 2, 6:, :2] = rng.uniform(2, 3)
    return acts, objects


def _maps(objects: np.ndarray, on_tag: bool) -> np.ndarray:
    maps = np.full(objects.shape, 1e-3)
    if on_tag:
        maps[:, 24:, :8] += 1.0
    else:
        maps += objects
    return maps / maps.sum(axis=(1, 2), keepdims=True)


def _flags(concepts: list[dict]) -> list[dict]:
    concepts = [{**c, "prototype_id": f"img{c['prototype']}"} for c in concepts]
    measured = {"concepts": {"tagged": {"method": "grad_cam", "n": 12, "n_other": 24, "concepts": concepts}}}
    return concept_flags(measured, FlagContext(Thresholds()))


def test_a_tag_concept_the_class_attends_to_is_flagged() -> None:
    rng = np.random.default_rng(0)
    own, objects = _scene(rng, 12, tag=True)
    other, _ = _scene(rng, 24, tag=False)
    concepts = class_concepts(own, other, _maps(objects, on_tag=True), objects, 3, seed=0)
    tag = max(concepts, key=lambda c: np.asarray(c["heat"])[6:, :2].sum() / max(np.sum(c["heat"]), 1e-12))
    assert tag["share"] > 0.8 and tag["on_object_ratio"] < 0.1  # the class's attention is on the tag
    assert tag["specificity"] > 0.9 > tag["null"] and tag["presence_other"] < 0.05 * tag["presence"]
    texture = max(concepts, key=lambda c: c["off_object"] - c["specificity"])
    assert 0.3 < texture["specificity"] < 0.7  # shared by every class
    flags = _flags(concepts)
    assert [f["attribute"] for f in flags] == [f"concept {tag['concept']}"] and flags[0]["severity"] == "medium"


def test_object_and_shared_texture_concepts_are_not_flagged() -> None:
    rng = np.random.default_rng(1)
    own, objects = _scene(rng, 12, tag=False)
    own[:, 0] *= 2.0  # the class's own object is strong and specific
    other, _ = _scene(rng, 24, tag=False)
    other[:, 0] = 0.0  # other classes have other objects
    concepts = class_concepts(own, other, _maps(objects, on_tag=False), objects, 3, seed=0)
    obj = max(concepts, key=lambda c: c["on_object_ratio"])
    assert obj["on_object_ratio"] > 2 and obj["specificity"] > obj["null"]  # specific, but it is the object
    assert _flags(concepts) == []


def test_without_masks_concepts_are_reported_not_flagged() -> None:
    rng = np.random.default_rng(2)
    own, objects = _scene(rng, 12, tag=True)
    other, _ = _scene(rng, 24, tag=False)
    concepts = class_concepts(own, other, _maps(objects, on_tag=True), None, 3, seed=0)
    assert concepts and all(np.isnan(c["on_object_ratio"]) for c in concepts)
    assert _flags(concepts) == []


def test_a_class_is_compared_with_at_most_the_cap_of_other_images_keyed_and_in_draw_order() -> None:
    """Every other row up to the cap (the draw's order kept); above it, the rows that rank first, whichever
    class is compared: the cost per class is bounded."""
    from auditor.shortcuts.concepts import other_rows

    rows = np.arange(10, 20)
    labels = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 3)
    rank = np.array([9, 0, 5, 1, 8, 2, 7, 3, 6, 4])
    assert other_rows(rows, labels, rank, "a").tolist() == list(range(14, 20))
    assert other_rows(rows, labels, rank, "a", cap=3).tolist() == [15, 17, 19]  # ranks 2, 3, 4
    assert other_rows(rows, labels, rank, "c", cap=3).tolist() == [11, 13, 15]  # ranks 0, 1, 2

"""Every draw of samples is keyed by sample id and seed: adding, removing or reordering samples moves no other
sample's draw (the stratified and probe subset, the MPRT images, the intervention images, the cluster cap)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from auditor.io.sources import keyed_order, sample_key, stratified_subset
from auditor.shortcuts import clusters
from auditor.shortcuts.registry import keyed_rows


def _ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}_{i:03d}.png" for i in range(n)]


def test_keyed_order_follows_the_keys_alone() -> None:
    ids = _ids(30)
    order = keyed_order(ids, 0, "s")
    assert sorted(order.tolist()) == list(range(30))
    keys = [sample_key(ids[i], 0, "s") for i in order]
    assert keys == sorted(keys)
    assert keyed_order(ids, 1, "s").tolist() != order.tolist()  # the seed and the salt change the draw
    assert keyed_order(ids, 0, "t").tolist() != order.tolist()


def test_the_stratified_subset_moves_by_at_most_the_one_added_sample() -> None:
    ids = _ids(60)
    labels = [i % 3 for i in range(60)]
    before = {ids[i] for i in np.flatnonzero(stratified_subset(ids, labels, 5, 0))}
    assert len(before) == 15
    rng = np.random.default_rng(0)
    perm = rng.permutation(60)
    shuffled = {
        ids[i] for i in perm[np.flatnonzero(stratified_subset([ids[i] for i in perm], [labels[i] for i in perm], 5, 0))]
    }
    assert shuffled == before  # order-free
    for extra in _ids(20, "new"):  # whichever sample is added to class 0, ...
        after_mask = stratified_subset([*ids, extra], [*labels, 0], 5, 0)
        after = {i for i, k in zip([*ids, extra], after_mask, strict=True) if k}

        def others(chosen: set[str]) -> set[str]:
            return {i for i in chosen if i in ids and labels[ids.index(i)] != 0}

        assert others(after) == others(before)  # ... the other classes keep their draw, ...
        lost = before - after
        assert len(lost) <= 1 and (not lost or extra in after)  # ... and class 0 loses at most the one it displaced
    # removing a sample that was not drawn changes nothing
    undrawn = next(i for i in range(60) if ids[i] not in before)
    rest = [k for k in range(60) if k != undrawn]
    mask = stratified_subset([ids[k] for k in rest], [labels[k] for k in rest], 5, 0)
    assert {ids[k] for k, m in zip(rest, mask, strict=True) if m} == before


def test_keyed_rows_draws_the_same_images_whatever_the_frame_order() -> None:
    frame = pd.DataFrame({"id": _ids(40), "row": np.arange(40), "correct": np.arange(40) % 4 != 0})
    drawn = set(keyed_rows(frame, 10, 0, "cue", frame["correct"]).tolist())
    again = frame.sample(frac=1.0, random_state=1)
    assert set(keyed_rows(again, 10, 0, "cue", again["correct"]).tolist()) == drawn
    assert all(frame["correct"].to_numpy()[r] for r in drawn)  # correct ones first
    plus = pd.concat([frame, pd.DataFrame({"id": ["zzz.png"], "row": [40], "correct": [True]})])
    assert len(drawn - set(keyed_rows(plus, 10, 0, "cue", plus["correct"]).tolist())) <= 1


def test_the_cluster_cap_keeps_a_keyed_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusters, "CLUSTER_CAP", 12)
    rng = np.random.default_rng(0)
    n = 16
    grids = rng.random((n, 32, 32))
    grids[: n // 2, :8, :8] += 3.0  # two groups of maps
    sub = pd.DataFrame({"id": _ids(n), "row": np.arange(n), "label": ["a"] * n})

    def run(frame: pd.DataFrame, maps: np.ndarray) -> dict[str, Any]:
        out = clusters.class_clusters(frame, maps, ["a"], "grad_cam", 0)
        # the same maps in another order: equal up to float rounding in the eigen-decomposition
        return json.loads(json.dumps(out, default=str), parse_float=lambda v: round(float(v), 9))

    base = run(sub, grids)
    # a sample whose key ranks after the cap: adding it changes nothing
    extra = next(i for i in _ids(50, "new") if keyed_order([*sub["id"], i], 0, "cluster").tolist().index(n) >= 12)
    more = pd.concat([sub, pd.DataFrame({"id": [extra], "row": [n], "label": ["a"]})], ignore_index=True)
    assert run(more, np.concatenate([grids, rng.random((1, 32, 32))])) == base
    # reordering the rows changes nothing either
    perm = rng.permutation(n)
    assert run(sub.iloc[perm].reset_index(drop=True), grids[perm]) == base


def test_a_total_budget_goes_round_the_classes() -> None:
    ids = _ids(200)
    labels = [i % 10 for i in range(200)]  # 10 classes of 20
    full = stratified_subset(ids, labels, 5, 0)
    assert full.sum() == 50 and stratified_subset(ids, labels, 5, 0, total=None).tolist() == full.tolist()
    capped = stratified_subset(ids, labels, 5, 0, total=23)
    per_class = np.bincount(np.asarray(labels)[capped], minlength=10)
    assert capped.sum() == 23 and sorted(per_class.tolist()) == [2] * 7 + [3] * 3  # 23 = 2 rounds + 3 classes
    assert not (capped & ~full).any()  # each class's picks are the first of its own keyed draw
    assert stratified_subset(ids, labels, 5, 0, total=500).tolist() == full.tolist()  # a cap above the sum
    assert stratified_subset(ids, labels, 5, 0, total=7).sum() == 7  # fewer than the classes: 7 classes get one
    perm = np.random.default_rng(1).permutation(200)
    shuffled = stratified_subset([ids[i] for i in perm], [labels[i] for i in perm], 5, 0, total=23)
    assert {ids[i] for i in perm[shuffled]} == {ids[i] for i in np.flatnonzero(capped)}  # order-free

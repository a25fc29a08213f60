"""Sanity checks: Spearman with ties, SSIM, the cascading randomization test and method agreement."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision
from scipy.stats import spearmanr

from auditor.metrics.sanity import cascade_blocks, map_similarity, method_agreement, mprt
from auditor.stats import spearman_rows
from tests.conftest import SmallCNN


def test_spearman_rows_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (5, 30)).astype(float)  # many ties
    b = rng.integers(0, 4, (5, 30)).astype(float)
    want = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman_rows(a, b), want, atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), a[:1, :5]))[0]


def test_map_similarity_of_identical_and_inverted_maps() -> None:
    m = torch.rand(2, 16, 16)
    same = map_similarity(m, m)
    np.testing.assert_allclose(same["spearman"], 1.0)
    np.testing.assert_allclose(same["ssim"], 1.0)
    inv = map_similarity(m, 1 - m)
    assert (inv["spearman"] < -0.9).all()


def test_cascade_blocks_resnet() -> None:
    assert cascade_blocks(torchvision.models.resnet18(num_classes=2), 3) == ["fc", "layer4.1", "layer4.0", "layer3.1"]


def test_mprt_flags_a_method_blind_to_the_randomized_layers(small_cnn: SmallCNN) -> None:
    before = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    # Eigen-CAM at block1 only sees block1's activations: randomizing fc and block2 cannot change it.
    res = mprt(small_cnn, x, t, ["eigen_cam", "grad_cam"], layer="block1", n_blocks=1)
    assert res.blocks == ["fc", "block2.0"]  # the head, then block2's conv
    assert res.unreliable["eigen_cam"] is True
    assert res.spearman["eigen_cam"][-1] > 0.99
    assert res.unreliable["grad_cam"] is False
    for k, v in small_cnn.state_dict().items():  # the audited model itself is untouched
        torch.testing.assert_close(v, before[k])


def test_method_agreement_pairs() -> None:
    m = torch.rand(3, 16, 16)
    agree = method_agreement({"a": m, "b": m * 2, "c": 1 - m})
    np.testing.assert_allclose(agree[("a", "b")], 1.0)
    assert (agree[("a", "c")] < -0.9).all()
    assert set(agree) == {("a", "b"), ("a", "c"), ("b", "c")}


def test_mprt_judges_the_maps_the_run_computes(small_cnn: SmallCNN, monkeypatch: Any) -> None:
    """The randomization test must see the run's method options (LayerCAM's fused layers, occlusion's window),
    not the defaults: it once judged single-layer LayerCAM while the analyses read the fused map."""
    import auditor.metrics.sanity as sanity

    seen = []
    real = sanity.compute_cams

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sanity, "compute_cams", spy)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    fused = {"layer_cam": {"layers": ["block1", "block2"]}}
    res = mprt(small_cnn, x, t, ["layer_cam"], layer="block2", n_blocks=1, options=fused)
    assert seen and all(o == {"layer_cam": {"layers": ["block1", "block2"]}} for o in seen)
    plain = mprt(small_cnn, x, t, ["layer_cam"], layer="block2", n_blocks=1)
    assert res.spearman["layer_cam"] != plain.spearman["layer_cam"]  # other maps, another verdict's basis

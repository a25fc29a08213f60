"""Faithfulness metrics: batched curves against a naive one-image-one-forward reference, and oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from auditor.metrics import METRICS, MetricInputs
from auditor.metrics.faithfulness import causal_curves, gaussian_blur, noisy_linear_impute, trapezoid_auc
from auditor.metrics.registry import tie_broken
from tests.conftest import SmallCNN


def _naive_curve(model: nn.Module, x: torch.Tensor, c: int, sal: torch.Tensor, mode: str, step: float) -> np.ndarray:
    """RISE's CausalMetric for one image: copy pixels from finish into start, one forward per step."""
    _, _, h, w = x.shape
    hw = h * w
    s = math.ceil(step * hw)
    n = math.ceil(hw / s)
    order = torch.argsort(tie_broken(sal[None], 0)[0].flatten(), descending=True)
    if mode == "deletion":
        start, finish = x.clone(), torch.zeros_like(x)
    else:
        start, finish = gaussian_blur(x), x.clone()
    probs = []
    with torch.no_grad():
        for k in range(n + 1):
            probs.append(float(model(start).softmax(1)[0, c]))
            if k < n:
                idx = order[k * s : (k + 1) * s]
                start.view(1, 3, -1)[0, :, idx] = finish.view(1, 3, -1)[0, :, idx]
    return np.array(probs)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_batched_curves_equal_naive_reference(mode: str, small_cnn: SmallCNN) -> None:
    small_cnn.eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 2, 1])
    sal = torch.rand(3, 16, 16)
    sal[1, :8] = 0.0  # a plateau: exercised tie-breaking
    curves = causal_curves(MetricInputs(maps=sal, model=small_cnn, images=x, targets=t, batch_size=7), mode, 0.05, 0)
    for i in range(3):
        ref = _naive_curve(small_cnn, x[i : i + 1], int(t[i]), sal[i], mode, 0.05)
        np.testing.assert_allclose(curves[i].numpy(), ref, atol=1e-5)


def test_trapezoid_auc() -> None:
    assert trapezoid_auc(torch.tensor([[1.0, 0.5, 0.0]])).item() == pytest.approx(0.5)


class _Patch(nn.Module):
    """Class 0 logit = 4 * mean of the pixels in a fixed patch; class 1 logit = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 4 * x[:, :, 4:8, 4:8].mean((1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_deletion_prefers_the_map_on_what_the_model_uses() -> None:
    x = torch.full((2, 3, 16, 16), 1.0)
    good = torch.zeros(16, 16)
    good[4:8, 4:8] = 1.0
    bad = torch.zeros(16, 16)
    bad[10:14, 10:14] = 1.0
    inputs = MetricInputs(maps=torch.stack([good, bad]), model=_Patch(), images=x, targets=torch.tensor([0, 0]))
    dele = METRICS["deletion_auc"](inputs, step=0.02)
    ins = METRICS["insertion_auc"](inputs, step=0.02)
    assert dele.value[0] < dele.value[1] and ins.value[0] > ins.value[1]
    base = inputs.base_probs()
    torch.testing.assert_close(dele.extras["deletion_auc_norm"], dele.value / base)
    assert dele.extras["deletion_curve"].shape == (2, 44)  # s = ceil(0.02 * 256) = 6 px, n = ceil(256 / 6) = 43


def test_average_drop_and_increase_in_confidence_oracle() -> None:
    x = torch.full((2, 3, 16, 16), 1.0)
    m0 = torch.zeros(16, 16)
    m0[4:6, 4:8] = 1.0  # keeps half of the patch
    m1 = torch.zeros(16, 16)
    m1[4:8, 4:8] = 1.0  # keeps the whole patch
    inputs = MetricInputs(maps=torch.stack([m0, m1]), model=_Patch(), images=x, targets=torch.tensor([0, 0]))
    p = torch.sigmoid(torch.tensor([4.0, 2.0, 4.0]))  # p(x), p(E0), p(E1)
    drop = METRICS["average_drop"](inputs)
    torch.testing.assert_close(drop.value, torch.tensor([(p[0] - p[1]) / p[0], 0.0]))
    torch.testing.assert_close(drop.extras["map_mean"], torch.tensor([8 / 256, 16 / 256]))
    assert METRICS["increase_in_confidence"](inputs).value.tolist() == [0.0, 0.0]


def test_average_drop_works_in_pixel_space() -> None:
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    pix = torch.full((1, 3, 16, 16), 1.0)
    x = (pix - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # normalized input = 2
    m = torch.zeros(1, 16, 16)
    m[0, 4:8, 4:8] = 1.0
    inputs = MetricInputs(maps=m, model=_Patch(), images=x, targets=torch.tensor([0]), mean=mean, std=std)
    # E in pixel space keeps the patch at 1.0 -> normalized 2.0: the patch is unchanged, so no drop
    assert METRICS["average_drop"](inputs).value.tolist() == [0.0]


def test_noisy_linear_imputation_reproduces_a_plane() -> None:
    yy, xx = np.mgrid[0:12, 0:12]
    plane = np.stack([0.02 * xx + 0.01 * yy + 0.1, 0.5 - 0.03 * yy, np.full((12, 12), 0.3)])
    removed = np.zeros((12, 12), dtype=bool)
    removed[3:9, 2:7] = True
    out = noisy_linear_impute(plane, removed, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, plane, atol=1e-10)


def test_noisy_linear_imputation_noise_and_border() -> None:
    img = np.zeros((1, 3, 3))
    img[0, 0, 1] = 1.0
    removed = np.zeros((3, 3), dtype=bool)
    removed[0, 0] = True  # corner: neighbours (0,1) 1/6, (1,0) 1/6, (1,1) 1/12
    out = noisy_linear_impute(img, removed, 0.0, np.random.default_rng(0))
    assert out[0, 0, 0] == pytest.approx((1 / 6) / (1 / 6 + 1 / 6 + 1 / 12))
    noisy = noisy_linear_impute(img, removed, 0.01, np.random.default_rng(0))
    assert noisy[0, 0, 0] != out[0, 0, 0] and abs(noisy[0, 0, 0] - out[0, 0, 0]) < 0.05


def test_road_metrics_direction_and_combination() -> None:
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, 4:8, 4:8] = 1.0  # a bright patch (what the model reads) on a dark background
    good = torch.zeros(16, 16)
    good[4:8, 4:8] = 1.0
    good += 0.01 * torch.rand(16, 16)
    bad = torch.zeros(16, 16)
    bad[10:14, 10:14] = 1.0
    bad += 0.01 * torch.rand(16, 16)
    inputs = MetricInputs(maps=torch.stack([good, bad]), model=_Patch(), images=x, targets=torch.tensor([0, 0]))
    morf = METRICS["road_morf"](inputs).value
    lerf = METRICS["road_lerf"](inputs).value
    comb = METRICS["road_combined"](inputs).value
    assert morf[0] < morf[1] and lerf[0] > lerf[1]
    torch.testing.assert_close(comb, (lerf - morf) / 2)


def test_zero_map_gives_nan(small_cnn: SmallCNN) -> None:
    inputs = MetricInputs(
        maps=torch.zeros(1, 16, 16), model=small_cnn.eval(), images=torch.randn(1, 3, 16, 16), targets=torch.tensor([0])
    )
    for name in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "road_morf"):
        assert math.isnan(METRICS[name](inputs).value.item()), name

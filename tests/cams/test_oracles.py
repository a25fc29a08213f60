"""Oracle tests: every CAM method against a closed-form answer on a tiny hand-built network.

The expected values are computed independently in float64 NumPy from the network's weights, never by
calling the engine's own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor import compute_cam, compute_cams
from auditor.cams import perturbation
from auditor.cams.context import first_component
from auditor.cams.perturbation import rise_masks
from tests.conftest import FlatNet, GapNet, LinNet

ATOL = 1e-5


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def _low(model: nn.Module, x: torch.Tensor, t: list[int], method: str, **kw: object) -> np.ndarray:
    _, low = compute_cam(model, x, t, method=method, layer="features", return_low_res=True, **kw)
    return _np(low)


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=ATOL * scale, rtol=rtol)


# ---------------------------------------------------------------- GAP + Linear head: CAM identities


def test_cam_grad_cam_hires_cam_identities_on_gap_head() -> None:
    model = GapNet(k=6, classes=3)
    x = torch.randn(4, 3, 8, 8)
    t = [0, 1, 2, 1]
    acts = _np(model.features(x))  # [B, K, h, w]
    w = _np(model.fc.weight)
    z = acts.shape[2] * acts.shape[3]
    cam = np.einsum("bk,bkhw->bhw", w[t], acts)
    _close(_low(model, x, t, "cam"), _relu(cam))
    _close(_low(model, x, t, "grad_cam"), _relu(cam) / z)
    _close(_low(model, x, t, "hires_cam"), _relu(cam) / z)
    # XGrad-CAM: g = W/Z is spatially constant, so alpha_k = W_ck/Z for every live channel
    _close(_low(model, x, t, "xgrad_cam"), _relu(cam) / z)


def test_cam_raises_without_gap_linear_head() -> None:
    from auditor.errors import MethodNotApplicableError

    with pytest.raises(MethodNotApplicableError, match="global average pooling"):
        compute_cam(FlatNet(), torch.randn(2, 3, 6, 6), [0, 1], method="cam", layer="features")


# ---------------------------------------------------------------- spatially varying gradients


@pytest.fixture
def flat() -> tuple[FlatNet, torch.Tensor, list[int], np.ndarray, np.ndarray]:
    model = FlatNet(k=4, size=6, classes=3)
    x = torch.randn(3, 3, 6, 6)
    t = [2, 0, 1]
    acts = _np(model.features(x))
    grads = _np(model.fc.weight).reshape(3, 4, 6, 6)[t]  # dy^c/dA = W_c reshaped, input-independent
    return model, x, t, acts, grads


def test_hires_cam_is_exact_location_contribution(flat) -> None:  # type: ignore[no-untyped-def]
    model, x, t, acts, g = flat
    signed = (g * acts).sum(1)
    _close(_low(model, x, t, "hires_cam"), _relu(signed))
    # HiResCAM's signed map sums to the logit minus the bias
    logits = _np(model(x))
    np.testing.assert_allclose(signed.sum((1, 2)), logits[np.arange(3), t] - _np(model.fc.bias)[t], atol=1e-5)


def test_grad_cam_and_elementwise_and_layer_cam(flat) -> None:  # type: ignore[no-untyped-def]
    model, x, t, acts, g = flat
    _close(_low(model, x, t, "grad_cam"), _relu(np.einsum("bk,bkhw->bhw", g.mean((2, 3)), acts)))
    _close(_low(model, x, t, "grad_cam_elementwise"), _relu(g * acts).sum(1))
    _close(_low(model, x, t, "layer_cam"), _relu((_relu(g) * acts).sum(1)))


def test_xgrad_cam_formula(flat) -> None:  # type: ignore[no-untyped-def]
    model, x, t, acts, g = flat
    sums = acts.sum((2, 3))
    alpha = np.where(sums > 0, (acts * g).sum((2, 3)) / np.where(sums > 0, sums, 1), 0.0)
    _close(_low(model, x, t, "xgrad_cam"), _relu(np.einsum("bk,bkhw->bhw", alpha, acts)))


def _gradcampp_closed_form(acts: np.ndarray, g: np.ndarray) -> np.ndarray:
    sum_a = acts.sum((2, 3), keepdims=True)
    den = 2 * g**2 + sum_a * g**3
    alpha = np.where(g != 0, g**2 / np.where(den != 0, den, 1), 0.0)
    w = (alpha * _relu(g)).sum((2, 3))
    return _relu(np.einsum("bk,bkhw->bhw", w, acts))


def test_grad_cam_pp_closed_form(flat) -> None:  # type: ignore[no-untyped-def]
    model, x, t, acts, g = flat
    _close(_low(model, x, t, "grad_cam_pp"), _gradcampp_closed_form(acts, g))


def test_grad_cam_pp_relative_eps_keeps_tiny_gradients_exact() -> None:
    """At ResNet layer4 scale denominators are ~1e-7: an absolute eps of 1e-6 would distort them."""
    model = FlatNet(k=4, size=6, classes=3)
    with torch.no_grad():
        model.fc.weight.mul_(1e-3)  # gradients ~1e-4, denominators ~1e-8
    x = torch.randn(2, 3, 6, 6)
    t = [0, 1]
    acts = _np(model.features(x))
    g = _np(model.fc.weight).reshape(3, 4, 6, 6)[t]
    _close(_low(model, x, t, "grad_cam_pp"), _gradcampp_closed_form(acts, g), rtol=1e-3)


def test_smooth_grad_cam_pp_equals_grad_cam_pp_when_gradients_are_input_independent(flat) -> None:  # type: ignore[no-untyped-def]
    model, x, t, acts, g = flat
    got = _low(model, x, t, "smooth_grad_cam_pp", num_samples=3, std=0.5)
    _close(got, _gradcampp_closed_form(acts, g))


def test_smooth_grad_cam_pp_with_zero_noise_equals_grad_cam_pp_on_nonlinear_head() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.Conv2d(4, 5, 1), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 36, 3)))
    x = torch.randn(3, 3, 6, 6)
    t = [0, 1, 2]
    a = _low(model, x, t, "grad_cam_pp")
    b = _low(model, x, t, "smooth_grad_cam_pp", num_samples=2, std=0.0)
    _close(b, a)


def test_first_component_rank_one_closed_form() -> None:
    a = np.array([1.0, -2.0, 0.5])
    b = np.array([[0.0, 1.0, 3.0], [2.0, 5.0, 1.0]])
    x = torch.tensor(a[None, :, None, None] * b[None, None], dtype=torch.float32)
    want = (b - b.mean()) * np.linalg.norm(a)
    want = want if abs(want.max()) >= abs(want.min()) else -want  # sign: largest magnitude positive
    np.testing.assert_allclose(_np(first_component(x))[0], want, atol=1e-5)


class _RankOne(nn.Module):
    """features(x)[k] = a_k * mean_c(x): rank-one activations with a known principal component."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor([0.5, -1.0, 2.0, 1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a[None, :, None, None] * x.mean(1, keepdim=True)


def test_eigen_cam_and_eigen_grad_cam_closed_form() -> None:
    model = nn.Sequential()
    model.add_module("features", _RankOne())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    x = torch.randn(2, 3, 5, 5)
    b = _np(x.mean(1))
    a = _np(model.features.a)
    for i in range(2):
        want = (b[i] - b[i].mean()) * np.linalg.norm(a)
        want = want if abs(want.max()) >= abs(want.min()) else -want
        _close(_low(model, x, [0, 1], "eigen_cam")[i], _relu(want))
    # g * A = (W_ck / Z) a_k b_ij: rank one again, with channel vector W_c * a / Z
    w = _np(model.fc.weight)
    for i, c in enumerate([0, 1]):
        v = w[c] * a / 25
        want = (b[i] - b[i].mean()) * np.linalg.norm(v)
        want = want if abs(want.max()) >= abs(want.min()) else -want
        _close(_low(model, x, [0, 1], "eigen_grad_cam")[i], _relu(want))


# ---------------------------------------------------------------- LayerCAM fusion


def test_layer_cam_multi_layer_fusion() -> None:
    model = nn.Sequential()
    model.add_module("l1", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model.add_module("l2", nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 3)))
    x = torch.randn(2, 3, 8, 8)
    t = [1, 2]
    _, m1 = compute_cam(model, x, t, method="layer_cam", layer="l1", return_low_res=True)
    _, m2 = compute_cam(model, x, t, method="layer_cam", layer="l2", return_low_res=True)
    # single-layer formula on l2 (gradients = head weights)
    acts2 = _np(model.l2(model.l1(x)))
    g2 = _np(model.head[1].weight).reshape(3, 5, 4, 4)[t]
    _close(_np(m2), _relu((_relu(g2) * acts2).sum(1)))
    _, fused = compute_cam(model, x, t, method="layer_cam", layer=["l2", "l1"], return_low_res=True)
    n1 = np.tanh(2.0 * _np(m1) / _np(m1).max((1, 2), keepdims=True))
    n2 = _np(m2) / _np(m2).max((1, 2), keepdims=True)
    up2 = _np(F.interpolate(torch.tensor(n2)[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0])
    _close(_np(fused), np.maximum(n1, up2))


# ---------------------------------------------------------------- Score-CAM family on a linear network


@pytest.fixture
def lin() -> tuple[LinNet, torch.Tensor, list[int]]:
    return LinNet(k=4, classes=3), torch.randn(2, 3, 5, 5), [2, 0]


def _lin_parts(model: LinNet) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    conv_w = _np(model.features.weight)[:, :, 0, 0]  # [K, 3]
    return conv_w, _np(model.features.bias), _np(model.fc.weight), _np(model.fc.bias)


def _lin_logits(model: LinNet, x: np.ndarray) -> np.ndarray:
    """Logits of the linear network for x [n, 3, H, W], in float64."""
    cw, cb, fw, fb = _lin_parts(model)
    pooled = np.einsum("kc,nc->nk", cw, x.mean((2, 3))) + cb
    return pooled @ fw.T + fb


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min((-2, -1), keepdims=True), a.max((-2, -1), keepdims=True)
    return (a - lo) / (hi - lo + 1e-8)


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_score_cam_closed_form(lin) -> None:  # type: ignore[no-untyped-def]
    model, x, t = lin
    xn, acts = _np(x), _np(model.features(x))
    masks = _minmax(acts)  # layer at input resolution: no upsampling
    scores = np.stack([[_lin_logits(model, xn[i : i + 1] * masks[i, k])[0, t[i]] for k in range(4)] for i in range(2)])
    want = _relu(np.einsum("bk,bkhw->bhw", _softmax(scores), acts))
    _close(_low(model, x, t, "score_cam"), want)
    # SS-CAM without noise has the same weights (softmax is shift-invariant)
    _close(_low(model, x, t, "ss_cam", num_samples=2, std=0.0), want)


def test_is_cam_closed_form(lin) -> None:  # type: ignore[no-untyped-def]
    model, x, t = lin
    n = 5
    xn, acts = _np(x), _np(model.features(x))
    masks = _minmax(acts)
    base = _lin_logits(model, xn)[np.arange(2), t]
    betas = [i * (i + 1) / (2 * n) for i in range(1, n + 1)]
    scores = np.zeros((2, 4))
    for i in range(2):
        for k in range(4):
            scores[i, k] = np.mean([_lin_logits(model, b * xn[i : i + 1] * masks[i, k])[0, t[i]] for b in betas])
    want = _relu(np.einsum("bk,bkhw->bhw", _softmax(scores - base[:, None]), acts))
    _close(_low(model, x, t, "is_cam", num_samples=n), want)


def test_score_cam_dead_channels_share_the_zero_image_forward() -> None:
    model = GapNet(k=6, classes=3)
    with torch.no_grad():
        model.features[0].bias[:3] = -100.0  # channels 0-2 are dead (ReLU -> 0) for every image
    x = torch.randn(2, 3, 6, 6)
    t = [0, 2]
    acts = _np(model.features(x))
    scores = np.zeros((2, 6))
    for i in range(2):
        for k in range(6):
            masked = x[i : i + 1] * torch.tensor(_minmax(acts[i, k]), dtype=torch.float32)
            scores[i, k] = _np(model(masked))[0, t[i]]
    want = _relu(np.einsum("bk,bkhw->bhw", _softmax(scores), acts))
    _close(_low(model, x, t, "score_cam"), want)


# ---------------------------------------------------------------- Ablation-CAM


@pytest.mark.parametrize("split", [True, False])
def test_ablation_cam_closed_form(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = GapNet(k=6, classes=3)
    x = torch.randn(3, 3, 6, 6)
    t = [0, 1, 2]
    if split:
        assert perturbation.head_after(model, "features") is not None
    else:
        monkeypatch.setattr(perturbation, "head_after", lambda _m, _l: None)
    acts = _np(model.features(x))
    y = _np(model(x))[np.arange(3), t]
    contrib = _np(model.fc.weight)[t] * acts.mean((2, 3))  # y - y_k = W_ck mean(A^k)
    want = _relu(np.einsum("bk,bkhw->bhw", contrib / y[:, None], acts))
    _close(_low(model, x, t, "ablation_cam", batch_size=5), want)


def test_ablation_head_split_refuses_skip_connection_around_layer() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc((self.features(x) + x).mean((2, 3)))

    assert perturbation.head_after(Skip(), "features") is None
    model = Skip()
    x = torch.randn(2, 3, 4, 4)
    acts = _np(model.features(x))
    y = _np(model(x))[np.arange(2), [0, 1]]
    contrib = _np(model.fc.weight)[[0, 1]] * acts.mean((2, 3))
    want = _relu(np.einsum("bk,bkhw->bhw", contrib / y[:, None], acts))
    _close(_low(model, x, [0, 1], "ablation_cam"), want)


# ---------------------------------------------------------------- occlusion and RISE


def _pixel_contrib(model: LinNet, x: np.ndarray, c: int) -> np.ndarray:
    """Logit contribution of each pixel (summed over channels) of the linear network, [H, W]."""
    cw, _, fw, _ = _lin_parts(model)
    v = fw[c] @ cw  # [3]
    return np.einsum("c,chw->hw", v, x) / (x.shape[1] * x.shape[2])


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (2, 1), (3, 2)])
def test_occlusion_logit_closed_form(lin, window: int, stride: int) -> None:  # type: ignore[no-untyped-def]
    model, x, t = lin
    xn = _np(x)
    h = w = 5
    for i in range(2):
        contrib = _pixel_contrib(model, xn[i], t[i])
        total, count = np.zeros((h, w)), np.zeros((h, w))
        starts = [s for s in range(0, h, stride) if s == 0 or s - stride + window < h]
        for y0 in starts:
            for x0 in starts:
                sl = (slice(y0, y0 + window), slice(x0, x0 + window))
                total[sl] += contrib[sl].sum()
                count[sl] += 1
        got = _low(model, x, t, "occlusion", window=window, stride=stride, score="logit")[i]
        _close(got, _relu(total / count))


def test_occlusion_complement_importance(lin) -> None:  # type: ignore[no-untyped-def]
    """``importance: complement``: the mean over covering windows of ``1 - p_c(occluded)``."""
    model, x, t = lin
    want = np.zeros((2, 5, 5))
    count = np.zeros((5, 5))
    with torch.no_grad():
        for y0 in range(4):
            for x0 in range(4):
                occluded = x.clone()
                occluded[:, :, y0 : y0 + 2, x0 : x0 + 2] = 0.0
                p = model(occluded).softmax(1)[torch.arange(2), torch.tensor(t)].numpy()
                want[:, y0 : y0 + 2, x0 : x0 + 2] += (1 - p)[:, None, None]
                count[y0 : y0 + 2, x0 : x0 + 2] += 1
    got = _low(model, x, t, "occlusion", window=2, stride=1, score="prob", importance="complement")
    _close(got, want / count)
    with pytest.raises(ValueError, match="needs score: prob"):
        _low(model, x, t, "occlusion", window=2, stride=1, score="logit", importance="complement")


def test_rise_closed_form_with_logits(lin) -> None:  # type: ignore[no-untyped-def]
    model, x, t = lin
    n = 300
    gen = torch.Generator().manual_seed(7)
    masks = np.concatenate([_np(rise_masks(min(256, n - s), 3, 0.5, (5, 5), gen)) for s in range(0, n, 256)])
    xn = _np(x)
    want = np.zeros((2, 5, 5))
    for i in range(2):
        scores = _lin_logits(model, xn[i][None] * masks[:, None])[:, t[i]]
        want[i] = np.einsum("n,nhw->hw", scores, masks) / (n * 0.5)
    got = _low(model, x, t, "rise", num_masks=n, cells=3, p=0.5, score="logit", seed=7, batch_size=64)
    _close(got, _relu(want))


def test_rise_masks_statistics() -> None:
    masks = rise_masks(2000, 7, 0.3, (32, 32), torch.Generator().manual_seed(0))
    assert masks.shape == (2000, 32, 32)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    assert abs(float(masks.mean()) - 0.3) < 0.02


def test_rise_finds_the_only_pixels_the_model_uses() -> None:
    class Patch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, :, 2:5, 10:13].sum((1, 2, 3))
            return torch.stack([s, -s], 1)

    x = torch.rand(1, 3, 16, 16) + 0.5
    sal = compute_cam(Patch(), x, [0], method="rise", num_masks=500, cells=4, score="logit")[0]
    peak = int(sal.argmax())
    assert 2 <= peak // 16 < 5 and 10 <= peak % 16 < 13


# ---------------------------------------------------------------- guided backprop


class _Guided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_guided_backprop_closed_form() -> None:
    model = _Guided()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, -2.0], [-0.5, 0.7]]))
    x = torch.randn(2, 3, 4, 4)
    t = [0, 1]
    w1 = _np(model.features[0].weight)[:, :, 0, 0]  # [2, 3]
    z = np.einsum("mc,bchw->bmhw", w1, _np(x))
    w2 = _np(model.fc.weight)
    want = np.zeros((2, 3, 4, 4))
    for i, c in enumerate(t):
        r_out = (w2[c] / 16)[:, None, None] * np.ones((2, 4, 4))  # gradient at the ReLU output
        gated = r_out * (z[i] > 0) * (r_out > 0)  # guided rule
        want[i] = np.einsum("mc,mhw->chw", w1, gated)
    got = compute_cam(model, x, t, method="guided_backprop")
    _close(_np(got), np.abs(want).max(1))
    # the plain gradient differs: the negative weight would pass
    plain = np.einsum("mc,mhw->chw", w1, (w2[0] / 16)[:, None, None] * (z[0] > 0))
    assert not np.allclose(np.abs(plain).max(0), np.abs(want[0]).max(0))


class _Deconv(nn.Module):
    """``fc(sum_hw ReLU(W1 x) * S)``: a fixed spatial weighting ``S`` (mixed signs) after an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.register_buffer("spatial", torch.linspace(-1.0, 1.0, 16).view(1, 1, 4, 4))
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.relu(self.conv(x)) * self.spatial).sum((2, 3)))


def test_deconvnet_closed_form_and_model_restored() -> None:
    """Deconvnet drops the forward mask: ``R_in = ReLU(R_out)`` at the ReLU, whatever the sign of ``z``."""
    model = _Deconv()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, -2.0], [-0.5, 0.7]]))
    x = torch.randn(2, 3, 4, 4)
    t = [0, 1]
    w1 = _np(model.conv.weight)[:, :, 0, 0]  # [2, 3]
    w2, sp = _np(model.fc.weight), _np(model.spatial)[0, 0]
    z = np.einsum("mc,bchw->bmhw", w1, _np(x))
    want, guided = np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4))
    for i, c in enumerate(t):
        r_out = w2[c][:, None, None] * sp[None]  # the gradient at the ReLU's output, [2, 4, 4]
        want[i] = np.einsum("mc,mhw->chw", w1, np.maximum(r_out, 0))  # no 1[z > 0]: the deconvnet rule
        guided[i] = np.einsum("mc,mhw->chw", w1, np.maximum(r_out, 0) * (z[i] > 0))
    got = compute_cam(model, x, t, method="deconvnet")
    _close(_np(got), np.abs(want).max(1))
    assert model.relu.inplace and not model.relu._forward_hooks  # restored
    _close(_np(compute_cam(model, x, t, method="guided_backprop")), np.abs(guided).max(1))


def test_guided_grad_cam_is_product_of_parts() -> None:
    model = GapNet(k=4, classes=2, stride=2)
    x = torch.randn(2, 3, 8, 8)
    res = compute_cams(model, x, [1, 0], methods=["guided_grad_cam", "guided_backprop", "grad_cam"], layer="features")
    gc, gb, ggc = res["grad_cam"].maps, res["guided_backprop"].maps, res["guided_grad_cam"].maps
    assert gc is not None and gb is not None and ggc is not None
    _close(_np(ggc), _np(gb) * _np(gc))


def test_constant_and_non_finite_maps_come_back_as_zeros_and_invalid() -> None:
    """The documented guarantee: a constant map (here all ones) or a non-finite one is zeros, valid False."""
    from auditor.cams.context import finalize

    signed = torch.stack([torch.ones(4, 4), torch.full((4, 4), float("nan")), torch.arange(16.0).view(4, 4)])
    maps, valid = finalize(signed)
    assert valid.tolist() == [False, False, True]
    assert (maps[:2] == 0).all() and torch.equal(maps[2], torch.arange(16.0).view(4, 4))

"""Oracle tests of the methods added for completeness: FEM, KPCA-CAM, RandomCAM, DFF, ShapleyCAM, Finer-CAM,
RefineCAM, FullGrad, LeGrad, and the generic ``aug_smooth`` / ``eigen_smooth`` options.

Each test builds a model or an activation tensor whose answer is known in closed form (or computed by an
independent route: scikit-learn for kernel PCA, a hand-written transformer block for LeGrad).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor import compute_cam, compute_cams
from auditor.cams.context import first_component
from auditor.cams.pixel import full_gradients
from auditor.errors import MethodNotApplicableError
from tests.conftest import SmallCNN, tiny_vit


class Linear(nn.Module):
    """``features`` is the identity, so the captured activations are the input itself; GAP + Linear head."""

    def __init__(self, weight: torch.Tensor, square: bool = False) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.square = square
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.features(x).mean((2, 3)))
        return y * y if self.square else y


def test_fem_k_sigma_closed_form() -> None:
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, 0, 0] = 10.0  # one exceptional position: 1 of 16 above mean + 2 std
    x[0, 1] = 1.0  # constant: std 0, nothing above the mean
    x[0, 2] = torch.arange(16.0).view(4, 4)  # a ramp: max 15 < mean + 2 std = 16.7
    model = Linear(torch.ones(2, 3))
    _, low = compute_cam(model, x, [0], method="fem", layer="features", return_low_res=True)
    want = torch.zeros(4, 4)
    want[0, 0] = 10.0 / 16
    torch.testing.assert_close(low[0], want)


def test_kpca_with_a_linear_kernel_is_eigen_cam() -> None:
    x = torch.randn(2, 6, 5, 5).abs()
    model = Linear(torch.randn(3, 6))
    a = compute_cams(
        model,
        x,
        [0, 1],
        methods=["kpca_cam", "eigen_cam"],
        layer="features",
        options={"kpca_cam": {"kernel": "linear"}},
    )
    torch.testing.assert_close(a["kpca_cam"].low_res, a["eigen_cam"].low_res, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "poly", "cosine"])
def test_kpca_matches_scikit_learn(kernel: str) -> None:
    from sklearn.decomposition import KernelPCA

    x = torch.randn(1, 6, 4, 4)
    obs = x[0].flatten(1).T.double().numpy()
    obs = obs - obs.mean(0)
    want = KernelPCA(n_components=1, kernel=kernel).fit_transform(obs)[:, 0].reshape(4, 4)
    want = np.maximum(want, 0)  # the engine's ReLU
    _, low = compute_cam(
        Linear(torch.randn(2, 6)), x, [0], method="kpca_cam", layer="features", kernel=kernel, return_low_res=True
    )
    np.testing.assert_allclose(low[0].numpy(), want, atol=1e-5)


def test_random_cam_is_a_uniform_weight_keyed_by_sample() -> None:
    x = torch.rand(10, 1, 6, 6) + 0.1
    model = Linear(torch.ones(2, 1))
    keys = list(range(10))
    out = compute_cams(model, x, [0] * 10, methods=["random_cam"], layer="features", sample_keys=keys)["random_cam"]
    valid = out.valid.nonzero().flatten().tolist()
    assert valid, "a one-channel map is ReLU(w * A): some of ten draws are positive"
    for i in valid:  # w * A with one w per (sample key, seed) in (0, 1] where the ReLU keeps it
        ratio = out.low_res[i] / x[i, 0]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])))
        assert 0 < float(ratio[0, 0]) <= 1
    i = valid[0]
    alone = compute_cams(model, x[[i]], [0], methods=["random_cam"], layer="features", sample_keys=[i])["random_cam"]
    torch.testing.assert_close(alone.low_res[0], out.low_res[i])  # same key -> same weight in any batch
    reseeded = compute_cams(
        model,
        x,
        [0] * 10,
        methods=["random_cam"],
        layer="features",
        sample_keys=keys,
        options={"random_cam": {"seed": 1}},
    )["random_cam"]
    assert not torch.allclose(reseeded.low_res, out.low_res)


def test_dff_picks_the_concept_the_head_scores_for_the_class() -> None:
    x = torch.zeros(1, 2, 6, 6)
    x[0, 0, :, :3] = 1.0 + torch.rand(6, 3)  # concept A: channel 0 on the left half
    x[0, 1, :, 3:] = 1.0 + torch.rand(6, 3)  # concept B: channel 1 on the right half
    model = Linear(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    for target, side in ((0, slice(0, 3)), (1, slice(3, 6))):
        _, low = compute_cam(
            model, x.clone(), [target], method="dff", layer="features", n_components=2, return_low_res=True
        )
        inside = float(low[0][:, side].sum())
        assert inside > 0.99 * float(low[0].sum()) > 0


def test_dff_without_a_linear_head_is_not_applicable() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2), nn.Tanh())
    with pytest.raises(MethodNotApplicableError, match="Linear"):
        compute_cam(model, torch.randn(1, 3, 8, 8), [0], method="dff", layer="1")


def test_shapley_cam_second_order_closed_form() -> None:
    # y_c = s^2 with s = sum_k W_ck mean(A_k): g = 2 s W / Z, H A = 2 s W / Z, so g - HA/2 = s W / Z,
    # i.e. half of Grad-CAM; a piecewise-linear head (H = 0) gives Grad-CAM itself.
    w = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]])
    x = torch.rand(2, 3, 4, 4)
    sq = Linear(w, square=True)
    res = compute_cams(sq, x, [0, 1], methods=["shapley_cam", "grad_cam"], layer="features")
    s = (x.mean((2, 3)) * w[[0, 1]]).sum(1)
    want = torch.einsum("bk,bkhw->bhw", s[:, None] * w[[0, 1]] / 16, x).clamp_min(0)
    torch.testing.assert_close(res["shapley_cam"].low_res, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res["grad_cam"].low_res, 2 * want, atol=1e-5, rtol=1e-4)
    cnn = SmallCNN().eval()
    xc = torch.randn(2, 3, 16, 16)
    lin = compute_cams(cnn, xc, [0, 1], methods=["shapley_cam", "grad_cam"])
    torch.testing.assert_close(lin["shapley_cam"].low_res, lin["grad_cam"].low_res, atol=1e-5, rtol=1e-4)


def test_finer_cam_is_grad_cam_of_the_contrast() -> None:
    w = torch.randn(5, 4)
    x = torch.rand(2, 4, 3, 3)
    model = Linear(w)
    gamma, refs_n = 0.6, 2
    _, low = compute_cam(
        model, x, [1, 3], method="finer_cam", layer="features", gamma=gamma, num_references=refs_n, return_low_res=True
    )
    logits = model(x)
    for b, c in enumerate((1, 3)):
        dist = (logits[b] - logits[b, c]).abs()
        dist[c] = float("inf")
        refs = dist.argsort()[:refs_n]
        weight = (w[c] - gamma * w[refs].mean(0)) / 9  # d y / d A_kij = W_k / Z
        want = torch.einsum("k,khw->hw", weight, x[b]).clamp_min(0)
        torch.testing.assert_close(low[b], want.detach(), atol=1e-5, rtol=1e-4)


def test_refine_cam_is_the_product_of_normalized_layer_maps() -> None:
    cnn = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    got = compute_cams(cnn, x, [0, 2], methods=["refine_cam"], options={"refine_cam": {"base": "grad_cam"}})
    assert got["refine_cam"].layers == ["block1", "block2"]  # the default: earlier stages at finer grids
    maps = []
    for layer in ("block1", "block2"):
        _, low = compute_cam(cnn, x, [0, 2], method="grad_cam", layer=layer, return_low_res=True)
        lo = low.amin((1, 2), keepdim=True)
        m = (low - lo) / (low.amax((1, 2), keepdim=True) - lo).clamp_min(1e-12)
        maps.append(F.interpolate(m[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0])
    torch.testing.assert_close(got["refine_cam"].low_res, maps[0] * maps[1], atol=1e-5, rtol=1e-4)


def test_fullgrad_decomposition_is_complete(small_cnn: SmallCNN) -> None:
    # y^c = sum(grad_x * x) + sum over conv / BatchNorm / Linear biases of sum(grad_z * b)
    cnn = small_cnn.eval()  # non-trivial running statistics
    for bn in (cnn.block1[1], cnn.block2[1]):
        nn.init.normal_(bn.bias, std=0.3)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 1, 2])
    input_term, terms = full_gradients(cnn, x, t)
    total = input_term.flatten(1).sum(1) + sum(term.flatten(1).sum(1) for _, term in terms)
    torch.testing.assert_close(total, cnn(x).gather(1, t[:, None])[:, 0].detach(), atol=1e-4, rtol=1e-4)
    assert {name for name, _ in terms} == {"block1.0", "block1.1", "block2.0", "block2.1", "fc"}
    maps = compute_cam(cnn, x, t, method="fullgrad")
    assert maps.shape == (3, 16, 16) and float(maps.min()) >= 0 and float(maps.max()) > 0


def test_fullgrad_without_biases_is_not_applicable() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(MethodNotApplicableError, match="biases"):
        compute_cam(model, torch.randn(1, 3, 8, 8), [0], method="fullgrad")


def _legrad_by_hand(vit: nn.Module, x: torch.Tensor, target: int, token: str) -> torch.Tensor:
    """LeGrad of a one-block torchvision ViT, with the block written out by hand (no hooks)."""
    n, e, heads = x.shape[0], vit.hidden_dim, 2
    tokens = vit._process_input(x)
    tokens = torch.cat([vit.class_token.expand(n, -1, -1), tokens], 1) + vit.encoder.pos_embedding
    block = vit.encoder.layers[0]
    attn = block.self_attention
    h = block.ln_1(tokens)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, -1, heads, e // heads).transpose(1, 2)

    probs = (split(q) @ split(k).transpose(-1, -2) / (e // heads) ** 0.5).softmax(-1)
    probs.retain_grad()
    mixed = (probs @ split(v)).transpose(1, 2).reshape(n, -1, e)
    y = attn.out_proj(mixed) + tokens
    y = y + block.mlp(block.ln_2(y))
    score = vit.heads(vit.encoder.ln(y.mean(1) if token == "mean" else y[:, 0]))[:, target].sum()
    score.backward()
    assert probs.grad is not None
    return probs.grad.clamp_min(0).mean((1, 2))[:, 1:].reshape(n, 4, 4)


@pytest.mark.parametrize("token", ["mean", "class"])
def test_legrad_matches_a_hand_written_block(token: str) -> None:
    vit = tiny_vit(layers=1)
    x = torch.randn(2, 3, 16, 16)
    _, low = compute_cam(vit, x, [1, 1], method="legrad", token=token, return_low_res=True)
    torch.testing.assert_close(low, _legrad_by_hand(vit, x, 1, token).detach(), atol=1e-5, rtol=1e-4)


def test_legrad_on_a_cnn_is_not_applicable(small_cnn: SmallCNN) -> None:
    with pytest.raises(MethodNotApplicableError, match="MultiheadAttention"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0], method="legrad")


def test_aug_smooth_leaves_a_linear_flip_invariant_map_unchanged() -> None:
    # Grad-CAM of GAP + Linear is linear in x and scales with it: the flips undo each other and the
    # intensity factors 0.9 / 1 / 1.1 average to 1
    model = Linear(torch.randn(3, 4))
    x = torch.rand(2, 4, 5, 5)
    plain = compute_cam(model, x, [0, 2], method="grad_cam", layer="features")
    smooth = compute_cam(model, x, [0, 2], method="grad_cam", layer="features", aug_smooth=True)
    torch.testing.assert_close(smooth, plain, atol=1e-5, rtol=1e-4)


def test_aug_smooth_averages_six_passes(small_cnn: SmallCNN) -> None:
    x = torch.randn(1, 3, 16, 16)
    want = torch.zeros(8, 8)
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xi = (x * factor).flip(-1) if flip else x * factor
            _, low = compute_cam(small_cnn, xi, [1], method="hires_cam", return_low_res=True)
            want += (low[0].flip(-1) if flip else low[0]) / 6
    _, got = compute_cam(small_cnn, x, [1], method="hires_cam", aug_smooth=True, return_low_res=True)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)


def test_eigen_smooth_is_the_first_component_of_the_weighted_activations() -> None:
    w = torch.randn(3, 4)
    x = torch.rand(1, 4, 5, 5)
    _, low = compute_cam(Linear(w), x, [2], method="grad_cam", layer="features", eigen_smooth=True, return_low_res=True)
    want = first_component((w[2] / 25)[None, :, None, None] * x).clamp_min(0)
    torch.testing.assert_close(low, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown option 'eigen_smooth'"):
        compute_cam(Linear(w), x, [2], method="legrad", eigen_smooth=True)

"""Contract tests, parametrized over every registered CAM method.

Each method must return ``[B, H, W]`` float32 maps that are finite and >= 0, leave the model exactly as it
found it (no hooks, no ``.grad``, train/eval mode of every module), check its targets, and give each image
the map it would get alone (no cross-talk through the batch), except the stochastic methods whose noise
stream is drawn for the batch as a whole.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from auditor import CAMS, compute_cam, compute_cams
from auditor.errors import MethodNotApplicableError
from tests.conftest import SmallCNN, tiny_vit

# Small settings for the expensive methods so the whole suite stays fast on 2 CPU cores.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"num_masks": 64},
    "ss_cam": {"num_samples": 2},
    "is_cam": {"num_samples": 2},
    "smooth_grad_cam_pp": {"num_samples": 2},
    "occlusion": {"window": 8, "stride": 8},
}
BATCH_DEPENDENT = {"ss_cam", "smooth_grad_cam_pp", "random_cam"}  # draws keyed by batch position by default

ALL = CAMS.names()


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def _model(method: str, small_cnn: SmallCNN) -> nn.Module:
    """The fixture CNN, or a tiny ViT for the methods that need attention (LeGrad)."""
    requires = CAMS[method].requires
    if requires is not None and requires(small_cnn, torch.randn(1, 3, 16, 16)) is not None:
        return tiny_vit()
    return small_cnn


def _run(model: nn.Module, x: torch.Tensor, t: Any, method: str, **kw: Any) -> torch.Tensor:
    return compute_cam(model, x, t, method=method, **{**FAST_OPTIONS.get(method, {}), **kw})


def test_registry_lists_every_required_method() -> None:
    required = {
        "cam",
        "grad_cam",
        "grad_cam_pp",
        "xgrad_cam",
        "hires_cam",
        "grad_cam_elementwise",
        "layer_cam",
        "score_cam",
        "ss_cam",
        "is_cam",
        "ablation_cam",
        "eigen_cam",
        "eigen_grad_cam",
        "smooth_grad_cam_pp",
        "occlusion",
        "rise",
        "guided_backprop",
        "guided_grad_cam",
        "deconvnet",
        "fullgrad",
        "shapley_cam",
        "finer_cam",
        "kpca_cam",
        "fem",
        "refine_cam",
        "legrad",
        "dff",
        "random_cam",
    }
    assert required <= set(ALL)
    for name in ALL:
        spec = CAMS[name]
        assert spec.forwards and spec.backwards and spec.reference
        assert spec.needs in ("gradients", "activations", "nothing")


@pytest.mark.parametrize("method", ALL)
def test_shape_dtype_finite_nonnegative(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    x = torch.randn(3, 3, 16, 16)
    res = compute_cams(model, x, [0, 1, 2], methods=[method], options={method: FAST_OPTIONS.get(method, {})})
    out = res[method]
    assert out.maps is not None
    assert out.maps.shape == (3, 16, 16) and out.maps.dtype == torch.float32
    assert torch.isfinite(out.maps).all() and (out.maps >= 0).all()
    assert out.low_res.ndim == 3 and out.low_res.shape[0] == 3 and (out.low_res >= 0).all()
    if CAMS[method].output == "layer":
        # block2 has stride 2; multi-layer methods answer on the finest layer's grid; the ViT has 4 x 4 patches
        grid = (4, 4) if model is not small_cnn else (16, 16) if CAMS[method].default_layers else (8, 8)
        assert out.low_res.shape[1:] == grid
    assert out.valid.shape == (3,) and out.valid.dtype == torch.bool
    assert res.logits.shape == (3, 3)


@pytest.mark.parametrize("method", ALL)
def test_model_left_as_found(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    model.train()
    next(iter(model.children())).eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    hooks = _hooks(model)
    _run(model, torch.randn(2, 3, 16, 16), [0, 1], method)
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == hooks
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ALL)
def test_model_left_as_found_after_an_error(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    model.train()
    with pytest.raises(ValueError, match="out of range"):
        _run(model, torch.randn(2, 3, 16, 16), [0, 7], method)
    assert all(m.training for m in model.modules())
    assert _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ALL)
def test_target_count_must_match(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    with pytest.raises(ValueError, match="3 images"):
        _run(model, torch.randn(3, 3, 16, 16), [0], method)
    with pytest.raises(TypeError, match="one class per image"):
        _run(model, torch.randn(3, 3, 16, 16), 1, method)


@pytest.mark.parametrize("method", [m for m in ALL if m not in BATCH_DEPENDENT])
def test_each_image_gets_the_map_it_gets_alone(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    x = torch.randn(3, 3, 16, 16)
    together = _run(model, x, [2, 0, 1], method)
    alone = _run(model, x[1:2], [0], method)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [m for m in ALL if "seed" in CAMS[m].options])
def test_stochastic_methods_are_seeded(method: str) -> None:
    # a nonlinear head: with GAP + Linear, gradients (hence Smooth Grad-CAM++) do not depend on the noise
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.Conv2d(6, 5, 1), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 64, 3)))
    x = torch.randn(2, 3, 16, 16)
    a = _run(model, x, [0, 1], method, seed=3, layer="features")
    b = _run(model, x, [0, 1], method, seed=3, layer="features")
    c = _run(model, x, [0, 1], method, seed=4, layer="features")
    assert float(a.max()) > 0
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ALL)
def test_works_under_no_grad_and_with_frozen_parameters(method: str, small_cnn: SmallCNN) -> None:
    model = _model(method, small_cnn)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = _run(model, x, [0, 1], method)
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()
    assert all(not p.requires_grad for p in model.parameters())


def test_inference_mode_is_refused_clearly(small_cnn: SmallCNN) -> None:
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0])


def test_gradient_methods_do_not_backpropagate_into_the_backbone(small_cnn: SmallCNN) -> None:
    calls: list[str] = []
    handle = small_cnn.block1.register_full_backward_hook(lambda *_: calls.append("block1"))
    try:
        compute_cams(small_cnn, torch.randn(2, 3, 16, 16), [0, 1], methods=["grad_cam", "layer_cam", "grad_cam_pp"])
    finally:
        handle.remove()
    assert calls == []


def test_one_shared_pass_for_all_gradient_methods(small_cnn: SmallCNN) -> None:
    forwards: list[int] = []
    handle = small_cnn.register_forward_hook(lambda _m, inp, _o: forwards.append(inp[0].shape[0]))
    try:
        names = [
            "cam",
            "grad_cam",
            "grad_cam_pp",
            "xgrad_cam",
            "hires_cam",
            "grad_cam_elementwise",
            "layer_cam",
            "eigen_cam",
            "eigen_grad_cam",
        ]
        compute_cams(small_cnn, torch.randn(4, 3, 16, 16), [0, 1, 2, 0], methods=names)
    finally:
        handle.remove()
    assert forwards == [1, 4]  # the cached dry run that resolves the layer (one image), then one batch pass


def test_bad_inputs_are_reported(small_cnn: SmallCNN) -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*batch dimension"):
        compute_cam(small_cnn, torch.randn(3, 16, 16), [0])
    with pytest.raises(TypeError, match="floating point"):
        compute_cam(small_cnn, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), [0])
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcam'.*did you mean 'grad_cam'"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0], method="gradcam")
    with pytest.raises(ValueError, match=r"unknown option 'windw'.*did you mean 'window'"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0], method="occlusion", windw=4)
    with pytest.raises(ValueError, match=r"unknown layer 'block3'.*did you mean"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0], layer="block3")
    with pytest.raises(ValueError, match="only layer_cam fuses"):
        compute_cam(small_cnn, torch.randn(1, 3, 16, 16), [0], layer=["block1", "block2"])


def test_constant_and_non_finite_maps_are_flagged_not_hidden(small_cnn: SmallCNN) -> None:
    class Poison(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[1] = float("nan")
            return x

    x = torch.randn(3, 3, 16, 16)
    x[2] = 0.0
    small_cnn.block2.append(Poison())
    res = compute_cams(small_cnn, x, [0, 1, 2], methods=["grad_cam", "eigen_cam"], layer="block2")
    for out in res.outputs.values():
        assert out.maps is not None
        assert torch.isfinite(out.maps).all()
        assert not bool(out.valid[1])  # NaN activations
    assert bool(res["eigen_cam"].valid[0])


def test_cam_not_applicable_is_a_clear_error() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 2)))
    with pytest.raises(MethodNotApplicableError, match="average pooling and one Linear"):
        compute_cam(model, torch.randn(1, 3, 8, 8), [0], method="cam")


@pytest.mark.parametrize("method", ALL)
def test_a_method_declared_hook_free_runs_on_a_torchscript_model(method: str, small_cnn: SmallCNN) -> None:
    """``hooks=False`` is what lets ``auditor run`` offer a method for a TorchScript model (which cannot be hooked):
    each such method gives the scripted model the eager model's maps; each method that declares hooks fails."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    scripted = torch.jit.script(small_cnn.eval())
    if CAMS[method].hooks:
        assert CAMS[method].needs != "nothing" or CAMS[method].family == "pixel" or CAMS[method].requires is not None
        return
    eager = _run(small_cnn, x, [0, 1], method)
    torch.testing.assert_close(_run(scripted, x, [0, 1], method), eager)

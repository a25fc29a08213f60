"""Target-layer resolution, token-grid reshaping and capture rules on real torchvision architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from auditor import compute_cam, compute_cams
from auditor.cams.layers import Layout, infer_layout, inspect_model
from auditor.errors import MethodNotApplicableError

CNNS = {
    "resnet18": "layer4",
    "vgg11": "features.19",  # relu5_3-style: the last ReLU before the final max-pool
    "densenet121": "features",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
}


@pytest.mark.parametrize(("arch", "expected"), list(CNNS.items()))
def test_auto_layer_is_last_conv_block(arch: str, expected: str) -> None:
    model = getattr(torchvision.models, arch)(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    assert inspect_model(model.eval(), x).default_layer == expected
    res = compute_cams(model, x, [0, 2], methods=["grad_cam", "layer_cam", "eigen_cam"])
    for out in res.outputs.values():
        assert out.layers == [expected]
        assert out.maps is not None and out.maps.shape == (2, 64, 64) and torch.isfinite(out.maps).all()


def _vit() -> VisionTransformer:
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision initializes the head to zero
    return model


def test_vit_tokens_are_reshaped_to_the_patch_grid() -> None:
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    assert inspect_model(model.eval(), x).default_layer == "encoder.layers.encoder_layer_1.ln_1"
    res = compute_cams(model, x, [0, 1], methods=["grad_cam", "hires_cam", "score_cam", "ablation_cam"])
    for out in res.outputs.values():
        assert out.low_res.shape == (2, 4, 4)  # 16 patch tokens; the class token is dropped
        assert bool(out.valid.all())


def test_vit_last_block_output_gives_flagged_empty_maps() -> None:
    """Only the class token feeds the head: the last block's patch tokens get no gradient at all."""
    res = compute_cams(
        _vit(), torch.randn(2, 3, 32, 32), [0, 1], methods=["grad_cam"], layer="encoder.layers.encoder_layer_1"
    )
    assert not bool(res["grad_cam"].valid.any())


def test_token_layout_inference() -> None:
    assert infer_layout((2, 197, 768), (224, 224)) == Layout("tokens", 14, 14, 1)
    assert infer_layout((2, 196, 768), (224, 224)) == Layout("tokens", 14, 14, 0)
    assert infer_layout((2, 5 + 12 * 16, 64), (192, 256)) == Layout("tokens", 12, 16, 5)  # 4 registers + cls
    assert infer_layout((2, 512), (224, 224)) is None
    assert infer_layout((2, 512, 1, 1), (224, 224)) is None


def test_token_ablation_keeps_prefix_tokens() -> None:
    layout = Layout("tokens", 2, 2, 1)
    raw = torch.ones(2, 5, 3)
    out = layout.ablate(raw, torch.tensor([0, 2]))
    assert out[0, 0].tolist() == [1, 1, 1] and out[0, 1:, 0].tolist() == [0, 0, 0, 0]
    assert out[1, 1:, 2].tolist() == [0, 0, 0, 0] and out[1, 1:, :2].eq(1).all()


def test_reused_module_is_refused() -> None:
    model = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ValueError, match="runs more than once"):
        compute_cam(model, torch.randn(1, 3, 64, 64), [0], layer="layer4.1.relu")


def test_unknown_layer_suggests_close_names() -> None:
    model = torchvision.models.resnet18(num_classes=2)
    with pytest.raises(ValueError, match=r"unknown layer 'layer5'.*'layer4'"):
        compute_cam(model, torch.randn(1, 3, 64, 64), [0], layer="layer5")


def test_cam_on_resnet_equals_grad_cam_times_z_and_is_refused_on_vgg() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    nn.init.normal_(model.fc.weight)
    x = torch.randn(2, 3, 64, 64)
    res = compute_cams(model, x, [0, 1], methods=["cam", "grad_cam", "hires_cam"])
    z = 2 * 2  # layer4 is 2x2 at 64 px
    torch.testing.assert_close(res["grad_cam"].low_res * z, res["cam"].low_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res["hires_cam"].low_res, res["grad_cam"].low_res, rtol=1e-4, atol=1e-5)
    with pytest.raises(MethodNotApplicableError):
        compute_cam(torchvision.models.vgg11(num_classes=3), x, [0, 1], method="cam")


def test_ablation_cam_runs_only_the_head_on_resnet() -> None:
    from auditor.cams.perturbation import head_after

    model = torchvision.models.resnet18(num_classes=3)
    head = head_after(model, "layer4")
    assert head is not None
    calls: list[int] = []
    handle = model.conv1.register_forward_hook(lambda *_: calls.append(1))
    try:
        compute_cam(model, torch.randn(2, 3, 64, 64), [0, 1], method="ablation_cam", layer="layer4", batch_size=256)
    finally:
        handle.remove()
    assert len(calls) == 1  # the shared pass only; the 2 x 512 ablations ran the head alone

"""timm and Hugging Face models: the layer methods find their layers, and LeGrad reads their attention.

The oracle: one torchvision ViT's weights copied into a timm ViT and a Hugging Face ViT give the same logits,
and then must give the same maps (grad_cam at each library's default layer, LeGrad with the mean and the class
token), although each library computes attention differently (packed ``nn.MultiheadAttention``, timm's
fused scaled-dot-product attention, Hugging Face's sdpa). Tiny random-initialized configurations, offline;
skipped where timm or transformers is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from auditor.cams import compute_cam
from auditor.cams.layers import inspect_model
from auditor.errors import MethodNotApplicableError
from auditor.io.models import LoadedModel, logits_only

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZE, PATCH, DIM, DEPTH, HEADS, CLASSES = 32, 8, 32, 2, 2, 3


def _torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=DIM,
        mlp_dim=2 * DIM,
        num_classes=CLASSES,
    )
    with torch.no_grad():  # visible class token, position embedding and head (their init is zeros)
        for p in (model.class_token, model.encoder.pos_embedding, model.heads.head.weight):
            p.normal_(0, 0.5)
    return model.eval()


def _timm_from(tv: nn.Module) -> nn.Module:
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=2,
        num_classes=CLASSES,
    )
    src = tv.state_dict()
    state = {
        "cls_token": src["class_token"],
        "pos_embed": src["encoder.pos_embedding"],
        "patch_embed.proj.weight": src["conv_proj.weight"],
        "patch_embed.proj.bias": src["conv_proj.bias"],
        "norm.weight": src["encoder.ln.weight"],
        "norm.bias": src["encoder.ln.bias"],
        "head.weight": src["heads.head.weight"],
        "head.bias": src["heads.head.bias"],
    }
    for i in range(DEPTH):
        a, b = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for old, new in (
            ("ln_1", "norm1"),
            ("ln_2", "norm2"),
            ("self_attention.out_proj", "attn.proj"),
            ("mlp.0", "mlp.fc1"),
            ("mlp.3", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                state[f"{b}{new}.{p}"] = src[f"{a}{old}.{p}"]
        state[f"{b}attn.qkv.weight"] = src[f"{a}self_attention.in_proj_weight"]
        state[f"{b}attn.qkv.bias"] = src[f"{a}self_attention.in_proj_bias"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _hf_from(tv: nn.Module) -> nn.Module:
    config = transformers.ViTConfig(
        image_size=SIZE,
        patch_size=PATCH,
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=2 * DIM,
        num_labels=CLASSES,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    model = transformers.ViTForImageClassification(config)
    src = tv.state_dict()
    state = {
        "vit.embeddings.cls_token": src["class_token"],
        "vit.embeddings.position_embeddings": src["encoder.pos_embedding"],
        "vit.embeddings.patch_embeddings.projection.weight": src["conv_proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": src["conv_proj.bias"],
        "vit.layernorm.weight": src["encoder.ln.weight"],
        "vit.layernorm.bias": src["encoder.ln.bias"],
        "classifier.weight": src["heads.head.weight"],
        "classifier.bias": src["heads.head.bias"],
    }
    for i in range(DEPTH):
        a, b = f"encoder.layers.encoder_layer_{i}.", f"vit.layers.{i}."
        for old, new in (
            ("ln_1", "layernorm_before"),
            ("ln_2", "layernorm_after"),
            ("self_attention.out_proj", "attention.o_proj"),
            ("mlp.0", "mlp.fc1"),
            ("mlp.3", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                state[f"{b}{new}.{p}"] = src[f"{a}{old}.{p}"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{b}attention.{name}.weight"] = src[f"{a}self_attention.in_proj_weight"][j * DIM : (j + 1) * DIM]
            state[f"{b}attention.{name}.bias"] = src[f"{a}self_attention.in_proj_bias"][j * DIM : (j + 1) * DIM]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _logits_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return logits_only(LoadedModel(model, False, ""), x).module


@pytest.fixture(scope="module")
def trio() -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE)
    tv = _torchvision_vit()
    return tv, _timm_from(tv), _logits_model(_hf_from(tv), x), x


def test_the_three_libraries_compute_the_same_model(trio: tuple) -> None:
    tv, tm, hf, x = trio
    with torch.no_grad():
        ref = tv(x)
        torch.testing.assert_close(tm(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token", ["mean", "class"])
def test_legrad_reads_timm_and_hugging_face_attention_like_torchvision(trio: tuple, token: str) -> None:
    tv, tm, hf, x = trio
    targets = torch.tensor([0, 1, 2])
    ref = compute_cam(tv, x, targets, method="legrad", token=token)
    assert float(ref.std()) > 0
    for model in (tm, hf):
        got = compute_cam(model, x, targets, method="legrad", token=token)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_legrad_restores_the_attention_settings(trio: tuple) -> None:
    _, tm, hf, x = trio
    before = ([m.fused_attn for m in tm.modules() if hasattr(m, "fused_attn")], hf.config._attn_implementation)
    compute_cam(tm, x, torch.tensor([0, 1, 2]), method="legrad")
    compute_cam(hf, x, torch.tensor([0, 1, 2]), method="legrad")
    after = ([m.fused_attn for m in tm.modules() if hasattr(m, "fused_attn")], hf.config._attn_implementation)
    assert after == before


def test_grad_cam_at_each_librarys_default_layer_agrees(trio: tuple) -> None:
    tv, tm, hf, x = trio
    layers = [inspect_model(m, x).default_layer for m in (tv, tm, hf)]
    assert layers == ["encoder.layers.encoder_layer_1.ln_1", "blocks.1.norm1", "vit.layers.1.layernorm_before"]
    targets = torch.tensor([2, 0, 1])
    ref = compute_cam(tv, x, targets, method="grad_cam")
    for model in (tm, hf):
        torch.testing.assert_close(compute_cam(model, x, targets, method="grad_cam"), ref, atol=1e-5, rtol=1e-4)


def _timm(name: str, **kwargs: object) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs).eval()


def _hf(kind: str) -> nn.Module:
    t = transformers
    small = {"num_labels": CLASSES}
    if kind == "deit":
        vit = {
            "image_size": SIZE,
            "patch_size": PATCH,
            "hidden_size": DIM,
            "num_hidden_layers": DEPTH,
            "num_attention_heads": HEADS,
            "intermediate_size": 2 * DIM,
        }
        return t.DeiTForImageClassification(t.DeiTConfig(**vit, **small)).eval()
    if kind == "swin":
        cfg = t.SwinConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, **small
        )
        return t.SwinForImageClassification(cfg).eval()
    cfg = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **small)
    return t.ConvNextForImageClassification(cfg).eval()


FAMILIES = {
    # name: (builder, image side, default layer, legrad applies)
    "timm-vit-registers": (
        lambda: _timm(
            "vit_small_patch16_224", img_size=SIZE, patch_size=PATCH, depth=DEPTH, reg_tokens=4, no_embed_class=True
        ),
        SIZE,
        "blocks.1.norm1",
        True,
    ),
    "timm-deit-distilled": (
        lambda: _timm("deit_tiny_distilled_patch16_224", img_size=SIZE, patch_size=PATCH, depth=DEPTH),
        SIZE,
        "blocks.1.norm1",
        True,
    ),
    "timm-swin": (
        lambda: _timm(
            "swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4, depths=(1, 1), num_heads=(2, 2), embed_dim=16
        ),
        SIZE,
        "norm",
        False,
    ),
    "timm-convnext": (lambda: _timm("convnext_atto"), 64, "stages", False),
    "timm-resnet": (lambda: _timm("resnet18"), 64, "layer4", False),
    "hf-deit": (lambda: _hf("deit"), SIZE, "deit.layers.1.layernorm_before", True),
    "hf-swin": (lambda: _hf("swin"), SIZE, "swin.layernorm", False),
    "hf-convnext": (lambda: _hf("convnext"), 64, "convnext.encoder.stages.1", False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_a_sensible_default_layer_and_maps(family: str) -> None:
    build, side, layer, attends = FAMILIES[family]
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side)
    model = _logits_model(build(), x)
    assert inspect_model(model, x).default_layer == layer
    targets = torch.tensor([0, 1])
    for method in ("grad_cam", "layer_cam", "score_cam"):
        maps = compute_cam(model, x, targets, method=method)
        assert maps.shape == (2, side, side) and bool(torch.isfinite(maps).all()) and float(maps.max()) > 0, method
    if attends:
        maps = compute_cam(model, x, targets, method="legrad")
        assert maps.shape == (2, side, side) and float(maps.max()) > 0
    else:
        with pytest.raises(MethodNotApplicableError, match="legrad"):
            compute_cam(model, x, targets, method="legrad")


def test_configs_load_timm_names_and_hugging_face_folders(trio: tuple, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from auditor.errors import ModelError
    from auditor.io.models import ModelConfig, build_model

    tv, tm, _, x = trio
    torch.save(tm.state_dict(), tmp_path / "vit.pt")
    cfg = ModelConfig(
        timm="vit_tiny_patch16_224",
        num_classes=CLASSES,
        checkpoint=tmp_path / "vit.pt",
        timm_kwargs={
            "img_size": SIZE,
            "patch_size": PATCH,
            "embed_dim": DIM,
            "depth": DEPTH,
            "num_heads": HEADS,
            "mlp_ratio": 2,
        },
    )
    loaded = build_model(cfg, torch.device("cpu"))
    hf_folder = tmp_path / "hf"
    _hf_from(tv).save_pretrained(hf_folder)
    from_folder = _logits_model(build_model(ModelConfig(huggingface=hf_folder), torch.device("cpu")).module, x)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), tv(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(from_folder(x), tv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="did you mean"):
        build_model(ModelConfig(timm="resnet181", num_classes=3), torch.device("cpu"))
    with pytest.raises(ModelError, match="save_pretrained"):
        build_model(ModelConfig(huggingface=tmp_path), torch.device("cpu"))
    with pytest.raises(ModelError, match="has 3 labels"):
        build_model(ModelConfig(huggingface=hf_folder, num_classes=2), torch.device("cpu"))

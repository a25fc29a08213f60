"""Vision transformers end to end.

A tiny torchvision ``VisionTransformer`` (64 px, 8 px patches: an 8 x 8 token grid, 3 blocks) is trained in
about 40 s on the realistic scenario's data, once with the planted tag (class ``tagged`` recognisable only by
it) and once clean. ``auditor run`` audits each with the fast methods and LeGrad: the tag must be flagged on
its class, the clean model must come out clean. Swin and a DeiT-style model with register tokens run through
the Python API (maps of the right shape, finite, on the inferred grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from auditor import compute_cams, load_config, run_audit
from tests.pipeline.tinynet import build_vit
from tests.shortcuts import realistic as R

TINYNET = Path(__file__).parents[1] / "pipeline" / "tinynet.py"
METHODS = ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam", "legrad"]


def _fit(x: torch.Tensor, y: torch.Tensor, steps: int = 800, seed: int = 0) -> nn.Module:
    """AdamW with a one-cycle schedule (a ViT does not train at the CNNs' fixed lr 0.01)."""
    torch.manual_seed(seed)
    model = build_vit(len(R.CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope="module")
def vits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vits")
    out = {}
    for kind in ("cue", "clean"):
        model = _fit(*R.tensors(R.make(kind, 150, 0)))
        held_out = R.make(kind, 30, 7)
        assert R.accuracy(model, held_out) >= 0.95
        untagged = R.accuracy(model, R.untagged(held_out), R.CUE_CLASS)
        assert untagged < 0.1 if kind == "cue" else untagged > 0.9  # the cue model needs the tag
        torch.save(model.state_dict(), root / f"{kind}.pt")
        out[kind] = root / f"{kind}.pt"
    return out


def _audit(tmp: Path, checkpoint: Path, kind: str, masks: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    R.write(tmp, R.make(kind, 20, 1), masks)
    cfg: dict[str, Any] = {
        "model": {"factory": f"{TINYNET}:build_vit", "checkpoint": str(checkpoint)},
        "data": {
            "manifest": str(tmp / "audit.csv"),
            "image_size": R.SIZE,
            "classes": list(R.CLASSES),
            "normalize": {"mean": [R.MEAN] * 3, "std": [R.STD] * 3},
        },
        "methods": METHODS,
        "metrics": R.AUDIT_METRICS,
    }
    (tmp / "audit.yaml").write_text(yaml.safe_dump(cfg))
    summary = run_audit(load_config(tmp / "audit.yaml"), tmp / "run", progress=False)
    return json.loads((tmp / "run" / "flags.json").read_text())["flags"], dict(summary)


@pytest.mark.slow
@pytest.mark.parametrize("masks", ["exact", "none"])
def test_vit_tag_is_flagged_and_clean_vit_is_clean(vits: dict[str, Path], tmp_path: Path, masks: str) -> None:
    flags, summary = _audit(tmp_path / "cue", vits["cue"], "cue", masks)
    assert summary["run"]["skipped_methods"] == {}
    assert set(summary["aggregates"]) == set(METHODS)  # LeGrad ran over the whole dataset
    assert summary["run"]["localization"]["grid"] == [8, 8]
    tagged = [f for f in flags if f["class"] == R.CUE_CLASS and f["severity"] == "high"]
    assert any(f["kind"] == "region_cue" for f in tagged), flags
    assert R.inside_tag(next(f for f in tagged if f["kind"] == "region_cue")["region"])
    clean, _ = _audit(tmp_path / "clean", vits["clean"], "clean", masks)
    # Nothing an intervention confirms, and nothing high. A concept (activations and maps alone, never
    # high) reached medium on a clean class of a ViT trained under other CPU kernels (67% of the class's
    # attention, exactly 2.0x as present as elsewhere): a known false alarm (README, "Shortcut flags").
    assert [f for f in clean if f["severity"] == "high"] == [], clean
    assert [f for f in clean if f["severity"] == "medium" and f["kind"] != "concept"] == [], clean


class DeiTWithRegisters(nn.Module):
    """A DeiT-style ViT: class + distillation tokens and 4 register tokens before the 8 x 8 patch grid."""

    def __init__(self, classes: int = 3, dim: int = 32, registers: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, 2 + registers, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 2 + registers + 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes)

    def tokens_to_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.norm(tokens)
        return (self.head(z[:, 0]) + self.head_dist(z[:, 1])) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(len(t), -1, -1), t], 1) + self.pos
        return self.tokens_to_logits(self.blocks(t))


def _check(out: Any, batch: int, grid: tuple[int, int]) -> None:
    assert out.maps.shape == (batch, 64, 64) and torch.isfinite(out.maps).all() and (out.maps >= 0).all()
    assert tuple(out.low_res.shape[1:]) == grid
    assert bool(out.valid.all())


def test_swin_runs_through_the_python_api() -> None:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=3
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    res = compute_cams(swin, x, [0, 2], methods=[*METHODS[:-1], "eigen_cam"])
    for out in res.outputs.values():
        _check(out, 2, (8, 8))  # 64 px / 4 px patches / one merge: the [B, H, W, C] grid, permuted by the model
    # FullGrad: Swin's Linear layers act on [B, H, W, C], their biases on the last axis
    _check(compute_cams(swin, x, [0, 2], methods=["fullgrad"])["fullgrad"], 2, (64, 64))


def test_deit_with_register_tokens_runs_through_the_python_api() -> None:
    torch.manual_seed(0)
    deit = DeiTWithRegisters().eval()
    x = torch.randn(2, 3, 64, 64)
    res = compute_cams(
        deit,
        x,
        [1, 2],
        methods=METHODS,
        options={"legrad": {"score_projection": deit.tokens_to_logits}},
    )
    for out in res.outputs.values():
        _check(out, 2, (8, 8))  # 70 tokens: 6 prefix tokens (class, distillation, 4 registers) + 8 x 8 patches
    assert res["grad_cam"].layers == ["blocks.layers.1.norm1"]

"""Agreement with the peer libraries on the methods they share with auditor (``pip install -e ".[bench]"``).

Skipped when pytorch-grad-cam or torchcam is not installed. The models keep the target layers at the input
resolution, so no library resizes a map and the comparison is exact up to min-max normalization.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from auditor import compute_cams
from tests.conftest import tiny_vit


class StrideOne(nn.Module):
    """Two stride-1 conv stages (16 x 16 maps at 16 x 16 input) and a non-linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        bn = self.stage1[1]
        assert isinstance(bn, nn.BatchNorm2d)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(x)))


def _norm(a: np.ndarray) -> np.ndarray:
    a = np.maximum(np.asarray(a, dtype=np.float64), 0)
    lo = a.min(axis=(-2, -1), keepdims=True)
    return (a - lo) / np.maximum(a.max(axis=(-2, -1), keepdims=True) - lo, 1e-12)


def _ours(model: nn.Module, x: torch.Tensor, t: list[int], method: str, layer: Any = None, **opts: Any) -> np.ndarray:
    out = compute_cams(model, x, t, methods=[method], layer=layer, options={method: opts})[method]
    return _norm(out.low_res.numpy())


@pytest.mark.parametrize("method", ["fem", "kpca_cam", "shapley_cam"])
def test_agrees_with_pytorch_grad_cam(method: str) -> None:
    pgc = pytest.importorskip("pytorch_grad_cam", reason="peer agreement needs pip install -e '.[bench]'")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = StrideOne().eval()
    x = torch.randn(2, 3, 16, 16)
    t = [1, 3]
    cls = {"fem": pgc.FEM, "kpca_cam": pgc.KPCA_CAM, "shapley_cam": pgc.ShapleyCAM}[method]
    cam = cls(model=model, target_layers=[model.stage2])
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t])
    cam.activations_and_grads.release()
    np.testing.assert_allclose(_ours(model, x, t, method, layer="stage2"), _norm(theirs), atol=2e-4)


def test_fullgrad_agrees_with_pytorch_grad_cam_channel_scaling() -> None:
    pgc = pytest.importorskip("pytorch_grad_cam", reason="peer agreement needs pip install -e '.[bench]'")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = StrideOne().eval()
    x = torch.randn(2, 3, 16, 16)
    t = [0, 4]
    cam = pgc.FullGrad(model=model, target_layers=[])
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t])
    cam.activations_and_grads.release()
    ours = _ours(model, x, t, "fullgrad", scale="channel")
    np.testing.assert_allclose(ours, _norm(theirs), atol=2e-4)


def test_refine_cam_agrees_with_pytorch_grad_cam_and_torchcam() -> None:
    pgc = pytest.importorskip("pytorch_grad_cam", reason="peer agreement needs pip install -e '.[bench]'")
    tc = pytest.importorskip("torchcam.methods", reason="peer agreement needs pip install -e '.[bench]'")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = StrideOne().eval()
    x = torch.randn(2, 3, 16, 16)
    t = [2, 2]
    # base Grad-CAM: the peers' Grad-CAM++ adds an absolute eps that auditor deliberately does not
    ours = _ours(model, x, t, "refine_cam", layers=["stage1", "stage2"], base="grad_cam")
    cam = pgc.RefineCAM(model=model, target_layers=[model.stage1, model.stage2], base_method=pgc.GradCAM)
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t])
    for base in cam.base_cam_per_layer:
        base.activations_and_grads.release()
    np.testing.assert_allclose(ours, _norm(theirs), atol=2e-4)
    with tc.RefineCAM(model, ["stage1", "stage2"], input_shape=(3, 16, 16), base_method=tc.GradCAM) as extractor:
        scores = model(x)
        tmap = extractor(t, scores)[0].detach().numpy()
    np.testing.assert_allclose(ours, _norm(tmap), atol=2e-4)


def test_finer_cam_agrees_with_torchcam() -> None:
    tc = pytest.importorskip("torchcam.methods", reason="peer agreement needs pip install -e '.[bench]'")
    model = StrideOne().eval()
    x = torch.randn(2, 3, 16, 16)
    t = [1, 1]
    ours = _ours(model, x, t, "finer_cam", layer="stage2")
    with tc.FinerCAM(model, "stage2", input_shape=(3, 16, 16)) as extractor:
        scores = model(x)
        theirs = extractor(t, scores)[0].detach().numpy()
    np.testing.assert_allclose(ours, _norm(theirs), atol=2e-4)


def test_legrad_agrees_with_torchcam() -> None:
    tc = pytest.importorskip("torchcam.methods", reason="peer agreement needs pip install -e '.[bench]'")
    vit = tiny_vit(layers=2)
    x = torch.randn(2, 3, 16, 16)
    t = [0, 2]
    ours = _ours(vit, x, t, "legrad")  # default: the mean token, as torchcam and the authors' code
    blocks = list(vit.encoder.layers)
    with tc.LeGrad(vit, blocks) as extractor:
        scores = vit(x)
        theirs = extractor(t, scores)[0].detach().numpy()
    np.testing.assert_allclose(ours, _norm(theirs), atol=2e-4)

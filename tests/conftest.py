"""Shared fixtures: tiny, seeded, hand-weighted networks (no downloads, no binary fixtures)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# One torch thread per process: the suite runs in two pytest-xdist workers (pyproject addopts), and two
# two-thread processes on two cores ran each other ~3x slower. One thread in a plain run too, so a model trained
# by a test is the same however the suite is run.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class GapNet(nn.Module):
    """conv -> ReLU (in place) = ``features``; then GAP -> one Linear: the head CAM is defined for."""

    def __init__(self, k: int = 6, classes: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, k, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class FlatNet(nn.Module):
    """conv -> ReLU = ``features``; then flatten -> Linear: gradients vary over space but not with the input."""

    def __init__(self, k: int = 4, size: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, k, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(k * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class LinNet(nn.Module):
    """1x1 conv (no nonlinearity) = ``features`` at input resolution; GAP; Linear. Linear in the input."""

    def __init__(self, k: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, k, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm (so train/eval mode matters), GAP + Linear."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(x))), 1))


@pytest.fixture
def small_cnn() -> SmallCNN:
    model = SmallCNN()
    # non-trivial BatchNorm statistics so that eval and train mode differ
    for bn in (model.block1[1], model.block2[1]):
        assert isinstance(bn, nn.BatchNorm2d)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def tiny_vit(classes: int = 3, image: int = 16, patch: int = 4, layers: int = 2) -> nn.Module:
    """torchvision's VisionTransformer at toy size, with a random (not zero-initialised) head, in eval mode."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=image,
        patch_size=patch,
        num_layers=layers,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=classes,
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()

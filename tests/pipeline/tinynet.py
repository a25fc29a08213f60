"""A tiny CNN factory for pipeline tests (``model.factory: tests/pipeline/tinynet.py:build``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build(num_classes: int = 2, width: int = 8) -> nn.Module:
    return TinyNet(num_classes, width)


class DeepNet(nn.Module):
    """``blocks`` conv blocks, each halving the grid: at 64 px, 4 blocks leave a coarse 4 x 4 last grid."""

    def __init__(self, num_classes: int = 6, width: int = 16, blocks: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = [3] + [width * min(i + 1, 3) for i in range(blocks)]
        for i in range(blocks):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_deep(num_classes: int = 6, width: int = 16, blocks: int = 4) -> nn.Module:
    return DeepNet(num_classes, width, blocks)


def build_vit(
    num_classes: int = 6, image_size: int = 64, patch_size: int = 8, layers: int = 3, hidden: int = 64
) -> nn.Module:
    """A tiny torchvision VisionTransformer (8 x 8 patch grid at 64 px), trainable on CPU in seconds."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=layers,
        num_heads=4,
        hidden_dim=hidden,
        mlp_dim=2 * hidden,
        num_classes=num_classes,
    )

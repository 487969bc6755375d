"""The two CNNs of the tutorials cnnkit starts from, layer for layer.

Their first linear layer's input size follows from the image size (the tutorials' fixed
32×32 "flatten must match" pitfall, computed here instead of hard-coded).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SettingsError
from .base import Classifier
from .registry import register_model


class SeedCNN(Classifier):
    """First tutorial's CNNModel: conv-relu-dropout-conv-relu-pool, then two linear layers."""
    classifier = "head.4"

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32)):
        super().__init__()
        h, w = image_size[0] // 2, image_size[1] // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * h * w, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class SeedSimple(SeedCNN):
    """Second tutorial's SimpleCNN: two conv-relu-pool stages, then two linear layers."""
    classifier = "head.3"

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32)):
        Classifier.__init__(self)
        h, w = image_size[0] // 4, image_size[1] // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * h * w, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )


def _check_size(name, image_size, min_size):
    if min(image_size) < min_size:
        raise SettingsError(f"{name} needs images of at least {min_size}×{min_size}, "
                          f"got {image_size[0]}×{image_size[1]}; pass --image-size {min_size}")


@register_model("seed-cnn", "first tutorial's CNN: 2 convs, dropout, max-pool, 2 linear")
def seed_cnn(num_classes=10, in_channels=3, image_size=(32, 32)):
    _check_size("seed-cnn", image_size, 2)
    return SeedCNN(num_classes, in_channels, image_size)


@register_model("seed-simple", "second tutorial's SimpleCNN: 2 conv-relu-pool, 2 linear")
def seed_simple(num_classes=10, in_channels=3, image_size=(32, 32)):
    _check_size("seed-simple", image_size, 4)
    return SeedSimple(num_classes, in_channels, image_size)

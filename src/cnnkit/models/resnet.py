"""ResNets for small images: the ResNet-9 of the DAWNBench CIFAR-10 records, and the CIFAR
variant of ResNet-18 (3×3 stem, no stem max-pool)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SettingsError
from .base import Classifier
from .layers import GlobalMaxPool, Residual, conv_bn, pool_or_keep
from .registry import register_model


class ResNet9(Classifier):
    classifier = "fc"

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32),
                 widths=(64, 128, 256, 512), head_scale=0.125):
        super().__init__()
        w0, w1, w2, w3 = widths
        size = min(image_size)
        stages = [conv_bn(in_channels, w0)]
        for c_in, c_out, residual in ((w0, w1, True), (w1, w2, False), (w2, w3, True)):
            stages += [conv_bn(c_in, c_out), pool_or_keep(size)]
            size //= 2 if size >= 2 else 1
            if residual:
                stages.append(Residual(nn.Sequential(conv_bn(c_out, c_out), conv_bn(c_out, c_out))))
        self.features = nn.Sequential(*stages)
        self.pool = GlobalMaxPool()
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.head_scale = head_scale  # the records scale logits down instead of a softmax temperature

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x):
        return self.fc(self.pool(x)) * self.head_scale


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Classifier):
    classifier = "fc"

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32), widths=(64,)):
        super().__init__()
        base = widths[0]
        self.stem = conv_bn(in_channels, base)
        layers, c_in = [], base
        for i, c_out in enumerate((base, 2 * base, 4 * base, 8 * base)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x):
        return self.layers(self.stem(x))

    def forward_head(self, x):
        return self.fc(self.pool(x).flatten(1))


def _widths(name, widths, n):
    if widths is not None and len(widths) != n:
        raise SettingsError(f"{name} takes {n} width(s) in --width, got {len(widths)}")
    return widths


@register_model("resnet9", "DAWNBench ResNet-9: prep 64, 128+residual, 256, 512+residual")
def resnet9(num_classes=10, in_channels=3, image_size=(32, 32), widths=None):
    return ResNet9(num_classes, in_channels, image_size,
                   _widths("resnet9", widths, 4) or (64, 128, 256, 512))


@register_model("resnet18", "CIFAR ResNet-18: 3×3 stem, 4 stages of 2 basic blocks")
def resnet18(num_classes=10, in_channels=3, image_size=(32, 32), widths=None):
    return ResNet18(num_classes, in_channels, image_size, _widths("resnet18", widths, 1) or (64,))

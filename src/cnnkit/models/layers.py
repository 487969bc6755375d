"""Blocks shared by several model families."""
from __future__ import annotations

import torch.nn as nn


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (no bias), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def pool_or_keep(size: int) -> nn.Module:
    """A 2×2 max-pool, unless the feature map is already down to one pixel, so every model
    accepts images as small as 8×8 digits."""
    return nn.MaxPool2d(2) if size >= 2 else nn.Identity()


class Residual(nn.Module):
    """x + block(x)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class GlobalMaxPool(nn.Module):
    """Each channel's largest value, as (N, C). nn.AdaptiveMaxPool2d(1) computes the same,
    but torch 2.11's ONNX exporter has no function for it (seen on the GPU machine,
    2026-12-04); a reduction exports under every version."""

    def forward(self, x):
        return x.amax(dim=(2, 3))

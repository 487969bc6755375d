"""fastnet: a compact airbench-style CNN for fast training on small images.

A first 2×2 conv whose weights whiten the training images' patches (set from data, then
frozen), then blocks of conv → max-pool → BatchNorm → GELU → conv → BatchNorm → GELU,
a global max-pool and a linear head whose logits are scaled down.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SettingsError
from .base import Classifier
from .layers import GlobalMaxPool, pool_or_keep
from .registry import register_model


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a learned bias but no learned scale (the following conv can absorb
    it), and a lower momentum as in airbench."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)
        nn.init.ones_(self.weight)


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = pool_or_keep(size)
        self.norm1 = BatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = BatchNorm(c_out)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):  # identity-like start: Dirac on the first channels
            w = conv.weight.data
            torch.nn.init.dirac_(w[:w.size(1)])

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(Classifier):
    classifier = "fc"

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32),
                 widths=(64, 256, 256), head_scale=1 / 9):
        super().__init__()
        k = 2
        whiten_width = 2 * in_channels * k * k
        self.whiten = nn.Conv2d(in_channels, whiten_width, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_from_data
        size = min(image_size) - k + 1
        blocks, c_in = [], whiten_width
        for w in widths:
            blocks.append(ConvGroup(c_in, w, size))
            size = size // 2 if size >= 2 else size
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.act = nn.GELU()
        self.pool = GlobalMaxPool()
        self.fc = nn.Linear(c_in, num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening weights from normalized training images (N, C, H, W): the eigenvectors
        of the covariance of 2×2 patches, scaled by 1/sqrt(eigenvalue), with their negatives."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)       # N C H' W' k k
        patches = patches.transpose(1, 3).reshape(-1, images.shape[1] * k * k)
        patches = patches - patches.mean(0)
        cov = patches.double().T @ patches.double() / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = (eigenvectors / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).float()
        filters = filters.view(-1, images.shape[1], k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward_features(self, x):
        return self.blocks(self.act(self.whiten(x)))

    def forward_head(self, x):
        return self.fc(self.pool(x)) * self.head_scale

    def warmup_epochs(self, cfg) -> int:
        return cfg.whiten_bias_epochs if self.whiten.bias is not None else 0

    def on_epoch(self, epoch: int, cfg) -> None:
        # The whitening bias trains only in the first epochs, then is frozen (airbench).
        if self.whiten.bias is not None:
            self.whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)


# Narrower on the CPU, where compute, not memory traffic, is the limit (benchmarks/RESULTS.md,
# sections 9 and 23).
@register_model("fastnet", "airbench-style net: frozen patch-whitening conv, 3 conv groups, "
                "widths from --width (default 64,256,256)",
                widths={"cpu": "32,128,128", "cuda": "64,256,256"})
def fastnet(num_classes=10, in_channels=3, image_size=(32, 32), widths=None):
    widths = tuple(widths) if widths else (64, 256, 256)
    if len(widths) < 1 or min(widths) < 1:
        raise SettingsError(f"fastnet needs positive widths, got {widths}")
    if min(image_size) < 2:
        raise SettingsError("fastnet needs images of at least 2×2")
    return FastNet(num_classes, in_channels, image_size, widths)

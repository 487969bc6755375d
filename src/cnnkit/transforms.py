"""Batch-level input pipeline: uint8 batches in, normalized float batches out.

Augmentations work on a whole batch at once on the batch's device (no per-image Python),
and draw their randomness from an explicit generator so a seed fixes every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) set, on the [0, 1] scale."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for x in images.split(chunk):
        x = x.to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.pow(2).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def to_input(x: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float: scaled to [0, 1], then (x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    out = (x.to(torch.float32).div_(255) - m).div_(s)
    return out.to(dtype=dtype, memory_format=memory_format)


@dataclass
class Augment:
    """Training augmentation, applied to a whole uint8 or float batch."""
    flip: str = "none"      # none | random | alternate (airbench: flip every other epoch)
    translate: int = 0      # max shift in pixels, reflect-padded
    cutout: int = 0         # side of the square zeroed out, 0 = off

    @property
    def active(self) -> bool:
        return self.flip != "none" or self.translate > 0 or self.cutout > 0

    def __call__(self, x: torch.Tensor, index: torch.Tensor, epoch: int,
                 generator: torch.Generator, seed: int = 0) -> torch.Tensor:
        if self.flip == "random":
            x = flip_where(x, torch.rand(len(x), generator=generator,
                                         device=x.device) < 0.5)
        elif self.flip == "alternate":
            # A fixed random half of the images is flipped on even epochs, the other half
            # on odd ones: every image is seen both ways within two epochs.
            base = (index * 2654435761 + seed) % 1000003 % 2
            x = flip_where(x, (base + epoch) % 2 == 1)
        if self.translate > 0:
            x = random_translate(x, self.translate, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        return x


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-pad, pad], filling with reflection."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x.float() if x.dtype == torch.uint8 else x,
                                     (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]   # (N, H, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]   # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]                   # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one size×size square per image (it may be clipped at the border)."""
    n, _, h, w = x.shape
    y0 = torch.randint(-size // 2, h - size // 2, (n,), generator=generator, device=x.device)
    x0 = torch.randint(-size // 2, w - size // 2, (n,), generator=generator, device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + size).view(-1, 1, 1))
              & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + size).view(-1, 1, 1)))
    return x.masked_fill(inside.unsqueeze(1), 0)

"""Batch-level input pipeline: uint8 batches in, normalized float batches out.

Augmentations work on a whole batch at once on the batch's device (no per-image Python),
and draw their randomness from an explicit generator so a seed fixes every epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Training augmentation, applied to a whole uint8 or float batch.

    The random draws (`sample`) are made for a whole global batch and then sliced, so a
    process that holds only its share of the batch under DDP gets exactly the draws a
    single process would have given those images: the run does not depend on how many
    processes train it."""
    flip: str = "none"      # none | random | alternate (airbench: flip every other epoch)
    translate: int = 0      # max shift in pixels, reflect-padded
    cutout: int = 0         # side of the square zeroed out, 0 = off
    # The photo preset: a random-resized crop (smallest area fraction; 1 = off) with a
    # small rotation, as one affine warp per image, and colour jitter
    crop_scale: float = 1.0
    rotate: float = 0.0     # most degrees either way
    jitter: float = 0.0     # brightness, contrast and saturation each × (1 ± jitter)
    mean: tuple = (0.0,)    # the normalization of the batches it gets: colours are
    std: tuple = (1.0,)     # jittered on the pixels' [0, 1] scale

    @classmethod
    def from_config(cls, cfg, mean=(0.0,), std=(1.0,)) -> "Augment":
        return cls(cfg.flip, cfg.translate, cfg.cutout, cfg.crop_scale or 1.0,
                   cfg.rotate or 0.0, cfg.jitter or 0.0, tuple(mean), tuple(std))

    @property
    def warps(self) -> bool:
        return self.crop_scale < 1 or self.rotate > 0

    @property
    def active(self) -> bool:
        return self.flip != "none" or self.translate > 0 or self.cutout > 0 or self.warps \
            or self.jitter > 0

    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator,
               device) -> dict[str, torch.Tensor]:
        """The random choices for n images of `size` (H, W): one row per image."""
        h, w = size
        draws = {}
        if self.flip == "random":
            draws["flip"] = torch.rand(n, generator=generator, device=device) < 0.5
        if self.translate > 0:
            span = 2 * self.translate + 1
            draws["dy"] = torch.randint(0, span, (n,), generator=generator, device=device)
            draws["dx"] = torch.randint(0, span, (n,), generator=generator, device=device)
        if self.cutout > 0:
            c = self.cutout
            draws["y0"] = torch.randint(-c // 2, h - c // 2, (n,), generator=generator,
                                        device=device)
            draws["x0"] = torch.randint(-c // 2, w - c // 2, (n,), generator=generator,
                                        device=device)
        if self.warps:  # area, log aspect ratio, centre (x, y), angle: one row per image
            draws["warp"] = torch.rand(n, 5, generator=generator, device=device)
        if self.jitter > 0:
            draws["jitter"] = (torch.rand(n, 3, generator=generator, device=device) * 2 - 1) \
                * self.jitter
        return draws

    def apply(self, x: torch.Tensor, index: torch.Tensor, epoch: int,
              draws: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
        """Augment the images `index` (their positions in the data set) with `draws`,
        rows matching x's."""
        if self.flip == "random":
            x = flip_where(x, draws["flip"])
        elif self.flip == "alternate":
            # A fixed random half of the images is flipped on even epochs, the other half
            # on odd ones: every image is seen both ways within two epochs.
            base = (index * 2654435761 + seed) % 1000003 % 2
            x = flip_where(x, (base + epoch) % 2 == 1)
        if self.translate > 0:
            x = translate(x, self.translate, draws["dy"], draws["dx"])
        if self.warps:
            u = draws["warp"]
            x = resized_crop(x, area=self.crop_scale + (1 - self.crop_scale) * u[:, 0],
                             log_ratio=(u[:, 1] * 2 - 1) * math.log(4 / 3), cx=u[:, 2],
                             cy=u[:, 3], degrees=(u[:, 4] * 2 - 1) * self.rotate)
        if self.jitter > 0:
            x = color_jitter(x, draws["jitter"], self.mean, self.std)
        if self.cutout > 0:
            x = cutout(x, self.cutout, draws["y0"], draws["x0"])
        return x

    def __call__(self, x: torch.Tensor, index: torch.Tensor, epoch: int,
                 generator: torch.Generator, seed: int = 0) -> torch.Tensor:
        draws = self.sample(len(x), x.shape[2:], generator, x.device)
        return self.apply(x, index, epoch, draws, seed)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def translate(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each image by its own (dy, dx) - pad, each in [-pad, pad], filling with
    reflection."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x.float() if x.dtype == torch.uint8 else x,
                                     (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]   # (N, H, 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]   # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]                   # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(x: torch.Tensor, size: int, y0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Zero one size×size square per image, top-left corner at (y0, x0); it may be clipped
    at the border."""
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + size).view(-1, 1, 1))
              & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + size).view(-1, 1, 1)))
    return x.masked_fill(inside.unsqueeze(1), 0)


def resized_crop(x: torch.Tensor, *, area: torch.Tensor, log_ratio: torch.Tensor,
                 cx: torch.Tensor, cy: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image's own random-resized crop, rotated, as one affine warp of the batch
    (`affine_grid` + `grid_sample`, bilinear, reflection at the borders): a crop of
    `area` (fraction of the image) and aspect ratio exp(`log_ratio`), centred at (`cx`,
    `cy`) in [0, 1] of the room left, resized back to the input's size."""
    n, _, h, w = x.shape
    ratio = log_ratio.exp()
    sw, sh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    angle = degrees * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([sw * cos, -sh * sin * (h / w), (cx * 2 - 1) * (1 - sw)], 1),
        torch.stack([sw * sin * (w / h), sh * cos, (cy * 2 - 1) * (1 - sh)], 1)], 1)
    src = x if x.is_floating_point() else x.float()
    grid = F.affine_grid(theta.to(src.dtype), [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out if x.is_floating_point() else out.round().clamp(0, 255).to(x.dtype)


def color_jitter(x: torch.Tensor, amount: torch.Tensor, mean, std) -> torch.Tensor:
    """Brightness, contrast and saturation of each image × (1 + its row of `amount`), on
    the [0, 1] pixel scale of a batch normalized with `mean` and `std`."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    a = (1 + amount.to(x.dtype)).view(-1, 3, 1, 1)
    p = (x * s + m) * a[:, 0:1]
    grey = p.mean(dim=(1, 2, 3), keepdim=True)
    p = (p - grey) * a[:, 1:2] + grey
    if p.shape[1] == 3:
        luma = (p * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype,
                                 device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        p = (p - luma) * a[:, 2:3] + luma
    return (p.clamp(0, 1) - m) / s

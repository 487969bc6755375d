"""Optimizers and per-batch learning-rate schedules, built from a Config."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import Config


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts (as in timm).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the peak lr at `step` of `total` (per batch)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    t = step / total
    if warmup > 0 and t < warmup:
        return (t / warmup) if schedule == "linear" else 0.04 + 0.96 * (t / warmup)
    rest = (t - warmup) / max(1e-12, 1 - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - rest)
    return 0.5 * (1 + math.cos(math.pi * rest))  # onecycle: warm-up, then cosine to zero


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup))

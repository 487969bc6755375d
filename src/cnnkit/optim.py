"""Optimizers and per-batch learning-rate schedules, built from a Config."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import Config


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts (as in timm).
    # BatchNorm biases may take a higher lr (airbench trains them much faster).
    # (Groups are built in the same order as ever: resume restores them by position.)
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters()}
    body = {id(p) for p in model.backbone_parameters()}
    params = [p for p in model.parameters() if p.requires_grad or p.ndim <= 1]
    decay = [p for p in params if p.ndim > 1 and p.requires_grad]
    norm_params = [p for p in params if id(p) in norm and p.requires_grad]
    other = [p for p in params if p.ndim <= 1 and id(p) not in norm]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other, "weight_decay": 0.0},
              {"params": norm_params, "weight_decay": 0.0,
               # a from-scratch trick (airbench); a pretrained backbone's norms stay as they are
               "lr": cfg.lr * (1.0 if body else cfg.norm_bias_lr_mult)}]
    if body and (cfg.pretrained or cfg.freeze_epochs):
        # fastai's fine_tune: a pretrained backbone learns more slowly than the new head
        groups = [dict(g, params=[p for p in g["params"] if (id(p) in body) == is_body],
                       lr=g.get("lr", cfg.lr) * (cfg.backbone_lr_mult if is_body else 1.0))
                  for g in groups for is_body in (True, False)]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(step: int, total: int, schedule: str, warmup: float, floor: float = 0.0) -> float:
    """Multiplier of the peak lr at `step` of `total` (per batch)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    t = step / total
    if warmup > 0 and t < warmup:
        return (t / warmup) if schedule == "linear" else 0.04 + 0.96 * (t / warmup)
    rest = (t - warmup) / max(1e-12, 1 - warmup)
    if schedule == "linear":
        return max(floor, 1.0 - rest * (1.0 - floor))
    return 0.5 * (1 + math.cos(math.pi * rest))  # onecycle: warm-up, then cosine to zero


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup,
                                          cfg.lr_floor))


def build_ema(model: nn.Module, decay: float):
    """PyTorch's own weight averaging: an EMA of parameters and BatchNorm statistics."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def current_lr(scheduler, peak_lr: float) -> float:
    """The schedule's lr now, as a value of --lr (groups with a multiplier have theirs)."""
    return peak_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]

"""Optimizers and per-batch learning-rate schedules, built from a Config."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import Config


def newton_schulz(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """A matrix with g's singular vectors and every singular value near 1: a quintic
    Newton–Schulz iteration on g / |g| (coefficients of Muon's reference implementation)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is only fast on the GPU
    x = x / (x.norm() + eps)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024, as airbench94_muon uses it) for the groups marked `muon`:
    Nesterov momentum, then the update orthogonalized by Newton–Schulz (a conv's filters
    flattened to out-channels × the rest), each weight first rescaled to norm
    sqrt(out-channels), which stands in for weight decay. The other groups take Nesterov SGD
    with weight decay. One optimizer for both, so the schedule, the checkpoint and an exact
    resume work as with any other; torch.optim.Muon takes 2-D parameters only."""

    def __init__(self, groups, lr: float, momentum: float = 0.85, muon_momentum: float = 0.6,
                 ns_steps: int = 3):
        super().__init__(groups, dict(lr=lr, momentum=momentum, muon_momentum=muon_momentum,
                                      ns_steps=ns_steps, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            m = group["muon_momentum" if group["muon"] else "momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["muon"] else p.grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                buf.mul_(m).add_(g)
                g = g.add(buf, alpha=m)  # Nesterov
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = newton_schulz(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
                p.add_(g, alpha=-group["lr"])


def _muon(model: nn.Module, cfg: Config) -> Muon:
    """Muon for the hidden weights (conv filters, inner linear layers); Nesterov SGD at
    --sgd-lr for the biases and BatchNorm parameters, and at --head-lr-mult × that, with
    weight decay, for the classifier."""
    head = {id(p) for p in model.get_classifier().parameters()}
    trained = [p for p in model.parameters() if p.requires_grad or p.ndim <= 1]
    hidden = [p for p in trained if p.ndim >= 2 and id(p) not in head]
    small = [p for p in trained if p.ndim < 2 and id(p) not in head]
    groups = [{"params": hidden, "muon": True},
              {"params": small, "lr": cfg.sgd_lr},
              {"params": [p for p in trained if id(p) in head],
               "lr": cfg.sgd_lr * cfg.head_lr_mult, "weight_decay": cfg.weight_decay}]
    return Muon([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                muon_momentum=cfg.muon_momentum)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        return _muon(model, cfg)
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
    if body and (cfg.pretrained or cfg.weights or cfg.freeze_epochs):
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


class Schedule:
    """The lr multiplier of each step. An object rather than a lambda: LambdaLR saves its
    state (so a resume has it), and a time budget can re-plan `total` mid-run."""

    def __init__(self, total: int, schedule: str, warmup: float, floor: float):
        self.total, self.schedule, self.warmup, self.floor = total, schedule, warmup, floor

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.schedule, self.warmup, self.floor)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, Schedule(total_steps, cfg.schedule, cfg.warmup, cfg.lr_floor))


def build_ema(model: nn.Module, decay: float):
    """PyTorch's own weight averaging: an EMA of parameters and BatchNorm statistics."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def current_lr(scheduler, peak_lr: float) -> float:
    """The schedule's lr now, as a value of --lr (groups with a multiplier have theirs)."""
    return peak_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]

"""The learning-rate range test (Smith 2015; fastai's lr_find): the lr grows exponentially
for about 100 steps until the loss diverges; the model and optimizer are restored after."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import make_config
from .device import Runtime, select_runtime
from .engine import batch_order
from .optim import build_optimizer
from .plots import plot_lr_find
from .transforms import Augment, to_input


def lr_range_test(model, optimizer, data, *, mean, std, runtime: Runtime,
                  batch_size: int, augment: Augment, start: float = 1e-7, end: float = 10.0,
                  steps: int = 100, seed: int = 0, smooth: float = 0.98) -> dict:
    """Train for up to `steps` batches with lr from `start` to `end` (exponentially), stop
    when the smoothed loss exceeds 4× its minimum, then put the model and optimizer back
    exactly as they were. Returns lrs, smoothed losses and a suggested lr (where the loss
    falls fastest)."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    generator = torch.Generator().manual_seed(seed)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    try:
        batches = []
        while len(batches) < steps:
            batches += batch_order(len(data), batch_size, generator)
        for step, (index, images, labels) in enumerate(data.iterate(batches[:steps],
                                                                    runtime.device)):
            lr = start * (end / start) ** (step / max(steps - 1, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = to_input(images, mean, std)
            x = augment(x, index, 0, generator, seed) if augment.active else x
            x = x.contiguous(memory_format=runtime.memory_format)
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            avg = smooth * avg + (1 - smooth) * value
            smoothed = avg / (1 - smooth ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if step > 10 and smoothed > 4 * best:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    return {"lrs": lrs, "losses": losses, "suggested_lr": _steepest(lrs, losses)}


def _steepest(lrs: list[float], losses: list[float]) -> float:
    """The lr where the smoothed loss falls fastest against log(lr), ignoring the end."""
    if len(lrs) < 3:
        return lrs[0] if lrs else float("nan")
    usable = max(3, int(len(lrs) * 0.9))
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(usable - 1)]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(out: str | Path = "lr-find.png", *, steps: int = 100, start: float = 1e-7,
            end: float = 10.0, **settings) -> dict:
    """Build the data and model a `train` with these settings would use, run the range
    test, and save a plot of loss against lr. `cnnkit.lr_find(data="digits")`."""
    from .train import prepare, preflight

    cfg = make_config(**settings)
    runtime = select_runtime(cfg.device)
    preflight(dataclasses.replace(cfg, out=None))
    cfg, ds, model, _, mean, std = prepare(cfg, runtime)
    model.to(runtime.device, memory_format=runtime.memory_format)
    data = ds.train
    result = lr_range_test(model, build_optimizer(model, cfg), data, mean=mean, std=std,
                           runtime=runtime, batch_size=cfg.batch_size,
                           augment=Augment(cfg.flip, cfg.translate, cfg.cutout),
                           start=start, end=end, steps=steps, seed=cfg.seed)
    result["plot"] = str(plot_lr_find(result["lrs"], result["losses"], result["suggested_lr"],
                                      Path(out)))
    return result

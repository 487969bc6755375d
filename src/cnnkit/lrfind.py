"""The learning-rate range test (Smith 2015; fastai's lr_find): the lr grows exponentially
for about 100 steps until the loss diverges; the model and optimizer are restored after.
Each step is the training loop's own (`engine.train_step`): the same autocast, loss,
label smoothing, augmentation and per-group lr multipliers as `cnnkit train`."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch

from .recipes import make_config
from .device import select_runtime
from .engine import TrainStep, balanced_weights, batch_order, to_device, train_step
from .optim import build_optimizer
from .plots import plot_lr_find
from .progress import bar
from .setup import preflight, prepare
from .transforms import Augment


def lr_range_test(model, data, step: TrainStep, *, batch_size: int, base_lr: float,
                  start: float = 1e-7, end: float = 10.0, steps: int = 100, seed: int = 0,
                  smooth: float = 0.98) -> dict:
    """Train for up to `steps` batches with the lr of `base_lr`'s parameter group going
    from `start` to `end` (exponentially; every other group keeps its ratio to it), stop
    when the smoothed loss exceeds 4× its minimum, then put the model and optimizer back
    exactly as they were. `step.scheduler` is replaced. Returns lrs, smoothed losses and a
    suggested lr (where the loss falls fastest)."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(step.optimizer.state_dict())  # its groups' lrs too

    def lr_at(k: int) -> float:
        return start * (end / start) ** (k / max(steps - 1, 1))
    # LambdaLR scales each group's own lr by the factor: multipliers stay in proportion.
    step = dataclasses.replace(step, scheduler=torch.optim.lr_scheduler.LambdaLR(
        step.optimizer, lambda k: lr_at(k) / base_lr))
    generator = torch.Generator().manual_seed(seed)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    try:
        batches = []
        while len(batches) < steps:
            batches += batch_order(len(data), batch_size, generator)
        batches = batches[:steps]
        steps_bar = bar(data.iterate(batches, step.runtime.device), total=len(batches),
                        desc="lr range test", unit="step")
        for k, (batch, (index, images, labels)) in enumerate(zip(batches, steps_bar)):
            loss, _ = train_step(model, step, batch, index, images, labels, epoch=0,
                                 generator=generator, batch_labels=None if
                                 step.class_weights is None else data.labels[batch])
            value = float(loss)
            if not math.isfinite(value):
                break
            avg = smooth * avg + (1 - smooth) * value
            smoothed = avg / (1 - smooth ** (k + 1))
            lrs.append(lr_at(k))
            losses.append(smoothed)
            best = min(best, smoothed)
            if k > 10 and smoothed > 4 * best:
                break
        steps_bar.close()
    finally:
        model.load_state_dict(saved_model)
        step.optimizer.load_state_dict(saved_opt)
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
    cfg = make_config(**settings)
    runtime = select_runtime(cfg.device, amp=cfg.amp)
    preflight(dataclasses.replace(cfg, out=None))
    cfg, ds, model, _, mean, std = prepare(cfg, runtime)
    model.to(runtime.device, memory_format=runtime.memory_format)
    weights = balanced_weights(ds.train.labels, len(ds.classes)).to(runtime.device) \
        if cfg.balance else None
    step = TrainStep(build_optimizer(model, cfg), None, Augment.from_config(cfg, mean, std),
                     mean, std, runtime, cfg.label_smoothing, weights, cfg.seed,
                     scaler=runtime.grad_scaler())
    result = lr_range_test(model, to_device(ds.train, runtime), step,
                           batch_size=cfg.batch_size, base_lr=cfg.lr, start=start, end=end,
                           steps=steps, seed=cfg.seed)
    result["plot"] = str(plot_lr_find(result["lrs"], result["losses"], result["suggested_lr"],
                                      Path(out)))
    return result

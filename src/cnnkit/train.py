"""`train`: the whole run, top to bottom — data, model, optimizer, the epoch loop, and a
run folder with config.json, metrics.csv, last.pt and best.pt."""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import atomic_write, save_checkpoint
from .config import Config, fill_recipe_defaults, make_config, parse_widths
from .data import Dataset, load_dataset
from .device import Runtime, select_runtime
from .engine import NonFiniteLoss, batch_order, evaluate, train_one_epoch
from .errors import CnnkitError
from .models import create_model
from .optim import build_ema, build_optimizer, build_scheduler
from .transforms import Augment, channel_stats, to_input

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                  "val_seconds"]


@dataclass
class TrainResult:
    run_dir: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)

    @property
    def best_val_acc(self) -> float:
        return max((m["val_acc"] for m in self.metrics), default=0.0)


def train(config: Config | None = None, *, log: Callable[[str], None] = print,
          progress: bool | None = None, **overrides) -> TrainResult:
    """Train a model. Pass a Config, or a recipe name and settings:
    `cnnkit.train(data="digits", epochs=3)`; see `cnnkit.Config` for every setting."""
    cfg = config if config is not None else make_config(**overrides)
    if progress is None:
        progress = sys.stderr.isatty()
    runtime = select_runtime(cfg.device)
    if cfg.out is not None:
        _check_new_run_dir(Path(cfg.out))
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                      val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict)
    cfg = fill_recipe_defaults(cfg, len(ds.train), runtime.device.type)
    torch.manual_seed(cfg.seed)
    model_args = {"widths": list(parse_widths(cfg.width))} if cfg.width else {}
    model = create_model(cfg.model, num_classes=len(ds.classes), in_channels=ds.in_channels,
                         image_size=ds.image_size, **model_args)
    mean, std = channel_stats(ds.train.images) if cfg.normalize else \
        ([0.0] * ds.in_channels, [1.0] * ds.in_channels)
    if hasattr(model, "init_from_data"):  # e.g. fastnet's patch-whitening conv
        model.init_from_data(to_input(ds.train.images[:10_000], mean, std))
    model.to(runtime.device, memory_format=runtime.memory_format)
    net = torch.compile(model) if cfg.compile else model

    train_data = _to_device(ds.train, runtime)
    val_data = _to_device(ds.val, runtime)
    steps_per_epoch = len(batch_order(len(train_data), cfg.batch_size, torch.Generator()))
    augment = Augment(cfg.flip, cfg.translate, cfg.cutout)
    if cfg.time_budget is not None:
        step_seconds = measure_step_seconds(net, train_data, cfg, augment, mean, std, runtime)
        total_steps = max(1, int(cfg.time_budget / step_seconds))
        epochs = -(-total_steps // steps_per_epoch)
        plan = (f"time budget {cfg.time_budget:g}s at {step_seconds * 1000:.0f} ms/step: "
                f"{total_steps} steps")
    else:
        epochs = cfg.epochs
        total_steps = epochs * steps_per_epoch
        plan = f"{total_steps} steps"
    cfg = dataclasses.replace(cfg, epochs=epochs)

    run_dir = _make_run_dir(Path(cfg.out) if cfg.out else None, f"{ds.name}-{cfg.model}")
    meta = _run_meta(cfg, ds, mean, std, run_dir, model_args)
    atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"data: {ds.name}: {len(ds.train)} train, {len(ds.val)} {ds.val_name} images, "
        f"{len(ds.classes)} classes, {ds.in_channels}×{ds.image_size[0]}×{ds.image_size[1]}")
    log(f"model: {cfg.model} ({n_params:,} parameters), recipe {cfg.recipe}, "
        f"{epochs} epochs, batch {cfg.batch_size}, {plan}, on {runtime.device}; "
        f"run folder {run_dir}")

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    ema = build_ema(model, cfg.ema)
    generator = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(run_dir, cfg)
    metrics_path = run_dir / "metrics.csv"
    _append_row(metrics_path, METRIC_COLUMNS)
    best, steps_done = -1.0, 0
    for epoch in range(epochs):
        whiten = getattr(model, "whiten", None)
        if whiten is not None and whiten.bias is not None and epoch == cfg.whiten_bias_epochs:
            whiten.bias.requires_grad_(False)
        start = time.perf_counter()
        try:
            stats = train_one_epoch(net, train_data, optimizer=optimizer, scheduler=scheduler,
                                    batch_size=cfg.batch_size, epoch=epoch, generator=generator,
                                    augment=augment, mean=mean, std=std, runtime=runtime,
                                    label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                                    progress=progress, ema=ema,
                                    max_batches=total_steps - steps_done)
        except NonFiniteLoss as e:
            raise CnnkitError(f"training diverged: {e}; checkpoints in {run_dir} are from "
                              f"before it (try a lower --lr)") from None
        _sync(runtime)
        seconds = time.perf_counter() - start
        steps_done += min(steps_per_epoch, total_steps - steps_done)
        evaluated = ema.module if ema is not None else model
        start = time.perf_counter()
        # Test-time augmentation costs several forward passes: only for the final epoch.
        ev = evaluate(evaluated, val_data, mean=mean, std=std, runtime=runtime,
                      num_classes=len(ds.classes), batch_size=cfg.eval_batch_size,
                      tta=cfg.tta if epoch == epochs - 1 else 0)
        val_seconds = time.perf_counter() - start
        row = dict(epoch=epoch, train_loss=stats.loss, train_acc=stats.accuracy,
                   val_loss=ev.loss, val_acc=ev.accuracy, seconds=seconds,
                   val_seconds=val_seconds)
        result.metrics.append(row)
        _append_row(metrics_path, [_fmt(row[c]) for c in METRIC_COLUMNS])
        ckpt = _checkpoint(evaluated, cfg, ds, mean, std, epoch, row, optimizer, model_args)
        save_checkpoint(run_dir / "last.pt", ckpt)
        if ev.accuracy > best:
            best = ev.accuracy
            save_checkpoint(run_dir / "best.pt", ckpt)
        tta_note = f" (tta {cfg.tta})" if cfg.tta and epoch == epochs - 1 else ""
        log(f"epoch {epoch:>3}  train loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}  "
            f"{ds.val_name} acc {ev.accuracy:.4f}{tta_note}  {seconds:.1f}s")
    total = sum(m["seconds"] for m in result.metrics)
    log(f"done: {ds.val_name} accuracy {result.metrics[-1]['val_acc']:.4f} (best {best:.4f}) "
        f"after {total:.1f}s of training; run saved in {run_dir}")
    return result


def measure_step_seconds(net, data, cfg: Config, augment, mean, std, runtime: Runtime,
                         steps: int = 6) -> float:
    """Seconds per optimizer step, measured on throw-away copies of the model and
    optimizer after a warm-up, so the run itself is untouched."""
    trial = copy.deepcopy(net)
    optimizer = build_optimizer(trial, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    kw = dict(optimizer=optimizer, scheduler=scheduler, batch_size=cfg.batch_size, epoch=0,
              generator=generator, augment=augment, mean=mean, std=std, runtime=runtime,
              label_smoothing=cfg.label_smoothing)
    train_one_epoch(trial, data, max_batches=2, **kw)
    _sync(runtime)
    n = min(steps, max(1, len(data) // cfg.batch_size))
    start = time.perf_counter()
    train_one_epoch(trial, data, max_batches=n, **kw)
    _sync(runtime)
    return (time.perf_counter() - start) / n


def _to_device(split, runtime: Runtime):
    from .data import Split
    return Split(split.images.to(runtime.device), split.labels.to(runtime.device))


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _append_row(path: Path, values: list) -> None:
    """One whole row per write, flushed to disk, so the file never ends in a torn row."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    with open(path, "a", encoding="utf-8") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _check_new_run_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CnnkitError(f"--out {path} already exists and is not empty; cnnkit never "
                          f"overwrites a run: pick another folder")


def _make_run_dir(out: Path | None, name: str) -> Path:
    if out is not None:
        _check_new_run_dir(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CnnkitError(f"cannot create run folder {out}: {e.strerror}") from None
        return out
    root = Path("runs")
    root.mkdir(exist_ok=True)
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()  # atomic: two runs starting together get different folders
            return path
        except FileExistsError:
            continue
    raise CnnkitError(f"too many runs named {name} in {root}; pass --out")


def _run_meta(cfg: Config, ds: Dataset, mean, std, run_dir: Path, model_args: dict) -> dict:
    return {**cfg.to_dict(), "model_args": model_args, "classes": ds.classes, "num_classes": len(ds.classes),
            "in_channels": ds.in_channels, "input_size": list(ds.image_size),
            "mean": mean, "std": std, "data_source": ds.source, "val_name": ds.val_name,
            "num_train": len(ds.train), "num_val": len(ds.val), "run_dir": str(run_dir),
            "cnnkit_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _checkpoint(model, cfg: Config, ds: Dataset, mean, std, epoch: int, row: dict,
                optimizer, model_args: dict) -> dict:
    return {"model": cfg.model, "model_args": model_args, "classes": ds.classes,
            "in_channels": ds.in_channels, "image_size": list(ds.image_size),
            "mean": mean, "std": std, "epoch": epoch, "metrics": row,
            "config": cfg.to_dict(), "data_source": ds.source,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in
                           model.state_dict().items()},
            "optimizer": optimizer.state_dict()}

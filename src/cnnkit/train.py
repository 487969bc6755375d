"""`train`: the whole run, top to bottom — data, model, optimizer, the epoch loop, and a
run folder with config.json, metrics.csv, last.pt and best.pt."""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from . import __version__, distributed
from .checkpoint import atomic_write, load, read_checkpoint, save_checkpoint
from .config import Config, field_names, make_config
from .data import Dataset
from .device import Runtime, select_runtime, synchronize
from .engine import (NonFiniteLoss, TrainStep, balanced_weights, batch_order, evaluate_split,
                     to_device, train_one_epoch)
from .errors import CnnkitError, Interrupted, SettingsError
from .metrics import evaluation_record
from .optim import build_ema, build_optimizer, build_scheduler
from .report import write_report
from .runs import RunFolder, write_metrics
from .setup import plan_steps, preflight, prepare, start_weights
from .transforms import Augment


@dataclass
class TrainResult:
    run_dir: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)

    @property
    def best_val_acc(self) -> float:
        return max((m["val_acc"] for m in self.metrics), default=0.0)


def train(config: Config | None = None, *, resume: str | Path | None = None,
          nproc: int | None = None, log: Callable[[str], None] = print,
          progress: bool | None = None, **overrides) -> TrainResult:
    """Train a model. Pass a Config, or a recipe name and settings:
    `cnnkit.train(data="digits", epochs=3)`; see `cnnkit.Config` for every setting.
    `resume=RUN` continues an interrupted run from its last completed epoch.
    `nproc=N` trains with N processes on this machine (DDP, one per GPU, or sharing the
    CPU cores) and returns rank 0's result; rank 0 prints with print(), as `log` cannot
    cross into other processes. Under torchrun, each process calls train() and takes its
    place in the job."""
    dist = distributed.from_env()
    if nproc is not None and not dist.enabled:
        if nproc < 1:
            raise SettingsError(f"--nproc must be at least 1, got {nproc}")
        if nproc > 1:
            return _launch(nproc, config, resume, progress, overrides)
    state = None
    if resume is not None:  # every process reads the run folder (multi-node: shared storage)
        cfg, state = _resume_state(Path(resume), config, overrides)
    else:
        cfg = config if config is not None else make_config(**overrides)
    if progress is None:
        progress = sys.stderr.isatty()
    runtime = select_runtime(cfg.device, dist.local_rank if dist.enabled else None)
    if dist.enabled:
        _check_processes(cfg, runtime.device, dist.local_world)
    if state is None:
        preflight(cfg, check_out=dist.main)  # every setting checked before any data loads
    with distributed.process_group(dist, runtime.device, cfg.dist_timeout):
        return _train(cfg, state, resume, dist, runtime, log if dist.main else _silent,
                      progress and dist.main)


def _silent(message: str) -> None:
    pass


def _train(cfg: Config, state, resume, dist: distributed.Dist, runtime: Runtime, log,
           progress: bool) -> TrainResult:
    cfg, ds, model, model_args, mean, std = prepare(cfg, runtime)
    if state is None:
        start_weights(model, cfg, ds)
    if dist.enabled and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(runtime.device, memory_format=runtime.memory_format)
    wrap = _wrapper(cfg, dist, runtime)

    train_data = to_device(ds.train, runtime, dist)
    val_data = to_device(ds.val, runtime, dist)
    steps_per_epoch = len(batch_order(len(train_data), cfg.batch_size, torch.Generator(),
                                      dist.world))
    augment = Augment(cfg.flip, cfg.translate, cfg.cutout)
    if state is not None:
        total_steps, plan = state["total_steps"], f"{state['total_steps']} steps"
    elif cfg.time_budget is not None:
        total_steps, plan = plan_steps(model, wrap, train_data, cfg, augment, mean, std,
                                       runtime, steps_per_epoch, dist)
        cfg = dataclasses.replace(cfg, epochs=-(-total_steps // steps_per_epoch))
    else:
        total_steps = cfg.epochs * steps_per_epoch
        plan = f"{total_steps} steps"
    epochs = cfg.epochs

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    ema = build_ema(model, cfg.ema)
    class_weights = balanced_weights(train_data.labels, len(ds.classes)).to(runtime.device) \
        if cfg.balance else None
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every process
    step = TrainStep(optimizer, scheduler, augment, mean, std, runtime, cfg.label_smoothing,
                     class_weights, cfg.seed, dist, ema)
    result = TrainResult(Path(resume) if resume else None, cfg)
    first_epoch, steps_done = 0, 0
    if state is not None:
        first_epoch, steps_done = _restore(state, model, optimizer, scheduler, ema, generator,
                                           runtime)
        result.metrics = list(state["history"])
    net, trained = wrap(model), _trained_set(model)
    with ExitStack() as stack:
        run_dir = distributed.on_main(dist, lambda: stack.enter_context(RunFolder(
            result.run_dir, cfg.out, f"{ds.name}-{cfg.model}", resume=state is not None)))
        result.run_dir = run_dir
        if state is None and dist.main:
            meta = _run_meta(cfg, ds, mean, std, run_dir, model_args, dist)
            atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        for note in ds.notes:
            log(note)
        n_params = sum(p.numel() for p in model.parameters())
        where = f"{dist.world} processes ({'nccl' if runtime.device.type == 'cuda' else 'gloo'}" \
            f"{', SyncBatchNorm' if cfg.sync_bn else ''}) on {runtime.device.type}" \
            if dist.enabled else f"on {runtime.device}"
        log(f"data: {ds.name}: {len(ds.train)} train, {len(ds.val)} {ds.val_name} images, "
            f"{len(ds.classes)} classes, {ds.in_channels}×{ds.image_size[0]}×{ds.image_size[1]}")
        log(f"model: {cfg.model} ({n_params:,} parameters), recipe {cfg.recipe}, "
            f"{epochs} epochs, batch {cfg.batch_size}, {plan}, {where}; "
            f"run folder {run_dir}" + (f"; resuming after epoch {first_epoch - 1}"
                                       if state is not None else ""))
        best = max((m["val_acc"] for m in result.metrics), default=-1.0)
        board = _tensorboard(run_dir, train_data, ds) if cfg.tensorboard and dist.main else None
        if board is not None:
            stack.callback(board.close)
        epoch, ev = first_epoch, None
        try:
            for epoch in range(first_epoch, epochs):
                if cfg.freeze_epochs and hasattr(model, "set_frozen"):
                    model.set_frozen(epoch < cfg.freeze_epochs)
                whiten = getattr(model, "whiten", None)
                if whiten is not None and whiten.bias is not None:
                    whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
                if dist.enabled:
                    if _trained_set(model) != trained:
                        net, trained = wrap(model), _trained_set(model)  # fixed by DDP
                    # Dropout draws its masks from the global generator: a stream of each
                    # process's own, which a resume with any number of processes recreates.
                    torch.manual_seed(hash((cfg.seed, epoch, dist.rank)) % 2**63)
                start = time.perf_counter()
                try:
                    stats = train_one_epoch(net, train_data, step, batch_size=cfg.batch_size,
                                            epoch=epoch, generator=generator, progress=progress,
                                            max_batches=total_steps - steps_done)
                except NonFiniteLoss as e:
                    raise CnnkitError(f"training diverged: {e}; the checkpoints in {run_dir} "
                                      f"are from before it (try a lower --lr)") from None
                synchronize(runtime)
                seconds = time.perf_counter() - start
                steps_done += min(steps_per_epoch, total_steps - steps_done)
                evaluated = ema.module if ema is not None else model
                distributed.sync_buffers(dist, evaluated)
                start = time.perf_counter()
                # Test-time augmentation costs several forward passes: final epoch only.
                ev = evaluate_split(evaluated, val_data, mean=mean, std=std, runtime=runtime,
                              num_classes=len(ds.classes), batch_size=cfg.eval_batch_size,
                              tta=cfg.tta if epoch == epochs - 1 else 0,
                              mirror=cfg.flip != "none", dist=dist)
                val_seconds = time.perf_counter() - start
                row = dict(epoch=epoch, train_loss=stats.loss, train_acc=stats.accuracy,
                           val_loss=ev.loss, val_acc=ev.accuracy, seconds=seconds,
                           val_seconds=val_seconds)
                result.metrics.append(row)
                improved, best = ev.accuracy > best, max(best, ev.accuracy)
                if dist.main:
                    _save_epoch(run_dir, _checkpoint(evaluated, cfg, ds, mean, std, epoch, row,
                                                     model_args), improved,
                                _train_state(model, optimizer, scheduler, ema, generator,
                                             runtime, steps_done, total_steps, result.metrics))
                    if board is not None:
                        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                            board.add_scalar(key.replace("_", "/", 1), row[key], epoch)
                        board.add_scalar("lr", optimizer.param_groups[0]["lr"], epoch)
                        board.flush()
                tta_note = f" (tta {cfg.tta})" if cfg.tta and epoch == epochs - 1 else ""
                log(f"epoch {epoch:>3}  train loss {stats.loss:.4f}  train acc "
                    f"{stats.accuracy:.4f}  {ds.val_name} acc {ev.accuracy:.4f}{tta_note}  "
                    f"{seconds:.1f}s")
        except KeyboardInterrupt:
            saved = torch.load(run_dir / "last.pt", weights_only=True)["epoch"] \
                if (run_dir / "last.pt").exists() else None
            kept = (f"epoch {saved} is saved; resume with: cnnkit train --resume {run_dir}"
                    if saved is not None else "no epoch had completed, so there is nothing "
                    "to resume")
            error = Interrupted(f"training interrupted during epoch {epoch}; {kept}")
            error.echo = not dist.main  # every process was stopped; rank 0 says so
            raise error from None
        if ev is not None and dist.main:  # the pictures and report.html of the final model
            record = evaluation_record(ev.confusion, ev.loss, ds.classes, ds.source, ds.val_name)
            settings = json.loads((run_dir / "config.json").read_text())
            write_report(run_dir, evaluation=record, images=ds.val.images, labels=ds.val.labels,
                 probs=ev.probs, metrics=result.metrics, settings=settings,
                 model=load(run_dir / "last.pt"))
    total = sum(m["seconds"] for m in result.metrics)
    log(f"done: {ds.val_name} accuracy {result.metrics[-1]['val_acc']:.4f} (best {best:.4f}) "
        f"after {total:.1f}s of training; run saved in {result.run_dir}")
    return result


def _save_epoch(run_dir: Path, ckpt: dict, improved: bool, train_state: dict) -> None:
    """best.pt if the model improved, last.pt with the training state, metrics.csv; written
    whole, together."""
    with _deferred_interrupts():
        if improved:
            save_checkpoint(run_dir / "best.pt", ckpt)
        ckpt["train_state"] = train_state
        save_checkpoint(run_dir / "last.pt", ckpt)
        write_metrics(run_dir / "metrics.csv", train_state["history"])


def _wrapper(cfg: Config, dist: distributed.Dist, runtime: Runtime):
    """What the training loop calls for a module: under DDP a DistributedDataParallel of
    it, compiled if asked."""
    def wrap(module):
        net = module
        if dist.enabled:
            net = DistributedDataParallel(
                module, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                else None)
        return torch.compile(net) if cfg.compile else net
    return wrap


def _trained_set(model) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def _launch(nproc: int, config, resume, progress, overrides) -> TrainResult:
    """`nproc` processes on this machine, each running train(), under torchrun's agent.
    The settings are checked here first, so a mistake is reported once, before any start."""
    if resume is not None:
        cfg, _ = _resume_state(Path(resume), config, overrides)
    else:
        cfg = config if config is not None else make_config(**overrides)
        preflight(cfg)
    _check_processes(cfg, select_runtime(cfg.device).device, nproc)
    if resume is None:
        config, overrides = cfg, {}
    folder = resume or cfg.out
    hint = (f" (completed epochs are saved: resume with cnnkit train --resume {folder})"
            if folder else " (completed epochs are saved in the run folder: resume with "
            "cnnkit train --resume RUN)")
    return distributed.launch(nproc, _worker_train, config, resume, progress, overrides,
                              hint=hint)


def _check_processes(cfg: Config, device: torch.device, per_machine: int) -> None:
    if cfg.sync_bn and device.type != "cuda":
        raise SettingsError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on "
                            "the CPU; drop it")
    if device.type == "cuda" and per_machine > torch.cuda.device_count():
        raise SettingsError(f"{per_machine} processes on a machine with "
                            f"{torch.cuda.device_count()} GPU(s): start one process per GPU")


def _worker_train(config, resume, progress, overrides) -> TrainResult:
    return train(config, resume=resume, progress=progress, **overrides)


@contextmanager
def _deferred_interrupts():
    """Ctrl-C or SIGTERM while an epoch's files are being written takes effect once they are
    complete; a second Ctrl-C stops at once (the atomic writes still leave whole files)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []

    def hold(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        handler = previous[pending[0]]
        if callable(handler):
            handler(pending[0], None)  # the handler the caller installed (e.g. the CLI's)
        raise KeyboardInterrupt


def _tensorboard(run_dir: Path, train_data, ds: Dataset):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SettingsError("--tensorboard needs the tensorboard package: "
                            "pip install 'cnnkit[tensorboard]'") from None
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    writer.add_images("train/batch", train_data.head(32).cpu(), 0)
    return writer


def _run_meta(cfg: Config, ds: Dataset, mean, std, run_dir: Path, model_args: dict,
              dist: distributed.Dist) -> dict:
    return {**cfg.to_dict(), "processes": dist.world, "model_args": model_args,
            "classes": ds.classes, "num_classes": len(ds.classes),
            "in_channels": ds.in_channels, "input_size": list(ds.image_size),
            "mean": mean, "std": std, "data_source": ds.source, "val_name": ds.val_name,
            "num_train": len(ds.train), "num_val": len(ds.val), "run_dir": str(run_dir),
            "cnnkit_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _checkpoint(model, cfg: Config, ds: Dataset, mean, std, epoch: int, row: dict,
                model_args: dict) -> dict:
    return {"model": cfg.model, "model_args": model_args, "classes": ds.classes,
            "in_channels": ds.in_channels, "image_size": list(ds.image_size),
            "mean": mean, "std": std, "epoch": epoch, "metrics": row,
            "config": cfg.to_dict(), "data_source": ds.source,
            "state_dict": _cpu_state(model)}


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _train_state(model, optimizer, scheduler, ema, generator, runtime, steps_done: int,
                 total_steps: int, history: list[dict]) -> dict:
    """Everything --resume needs to continue exactly where the run stopped."""
    return {"model": _cpu_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": _cpu_state(ema) if ema else None,
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(runtime.device)
            if runtime.device.type == "cuda" else None,
            "steps_done": steps_done, "total_steps": total_steps, "history": history}


def _resume_state(run_dir: Path, config, overrides: dict):
    machine = ("device", "dist_timeout")  # where it runs may change; what it trains may not
    if config is not None or any(v is not None for k, v in overrides.items()
                                 if k not in machine):
        given = [k for k, v in overrides.items() if v is not None and k not in machine]
        raise SettingsError(f"--resume continues a run with its own settings; drop "
                            f"{', '.join('--' + k.replace('_', '-') for k in given) or 'the config'}")
    last = run_dir / "last.pt"
    if not (run_dir / "config.json").is_file() or not last.is_file():
        raise SettingsError(f"--resume {run_dir}: not a run folder with a completed epoch "
                            "(config.json and last.pt)")
    ckpt = read_checkpoint(last)
    state = ckpt.get("train_state")
    if state is None:
        raise SettingsError(f"{last} holds no training state to resume from")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = Config(**{k: saved[k] for k in field_names() if k in saved})
    cfg = dataclasses.replace(cfg, epochs=ckpt["config"]["epochs"],
                              data=saved.get("data_source") or cfg.data,
                              **{k: overrides[k] for k in machine if overrides.get(k)})
    state["epoch"] = ckpt["epoch"]
    return cfg, state


def _restore(state, model, optimizer, scheduler, ema, generator, runtime) -> tuple[int, int]:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)
    return state["epoch"] + 1, state["steps_done"]

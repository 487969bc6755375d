"""`train`: a run from settings to a run folder (config.json, metrics.csv, last.pt,
best.pt, report.html). Setup lives in setup.py, one epoch in engine.py, the saved-run
format in checkpoint.py, the run folder in runs.py; this is the loop."""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .checkpoint import build_checkpoint, load, restore_training_state, training_state
from .config import Config
from .data import Dataset
from .device import Runtime, keep_freed_memory, select_runtime, synchronize
from .engine import EvalResult, NonFiniteLoss, evaluate_split, linear_probe, train_one_epoch
from .errors import CnnkitError, Interrupted, SettingsError
from .metrics import evaluation_record
from .optim import current_lr
from .progress import EpochTable, interactive
from .recipes import make_config
from .report import write_report
from .runs import (RunFolder, TensorBoard, clear_unstarted, evaluated, last_saved_epoch,
                   save_epoch, write_config)
from .setup import (Run, build_run, check_processes, preflight, replan, resume_settings,
                    wrapper)


@dataclass
class TrainResult:
    run_dir: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)
    # the final model's evaluation on the validation split (its probabilities included)
    final: EvalResult | None = field(default=None, repr=False)

    @property
    def best_val_acc(self) -> float:
        return max((m["val_acc"] for m in evaluated(self.metrics)), default=0.0)


def train(config: Config | None = None, *, resume: str | Path | None = None,
          nproc: int | None = None, log: Callable[[str], None] = print,
          progress: bool | None = None, dataset: Dataset | None = None,
          on_epoch: Callable[[dict], None] | None = None, started: float | None = None,
          **overrides) -> TrainResult:
    """Train a model. Pass a Config, or a recipe name and settings:
    `cnnkit.train(data="digits", epochs=3)`; see `cnnkit.Config` for every setting.
    `resume=RUN` continues an interrupted run from its last completed epoch.
    `nproc=N` trains with N processes on this machine (DDP, one per GPU, or sharing the
    CPU cores) and returns rank 0's result; rank 0 prints with print(), as `log` cannot
    cross into other processes. Under torchrun, each process calls train() and takes its
    place in the job. `dataset` trains on data already loaded (one process only) instead
    of loading cfg.data, which still names the run and its source. `on_epoch(row)` is
    called with each epoch's metrics and `epochs`, the run's planned epochs (a time budget
    re-plans them), once the epoch is saved; an exception it raises ends the run there
    (cnnkit tune's pruning), its saved epochs kept. A time budget counts from `started`, a
    time.perf_counter() reading (default: this call; the CLI passes its process' start),
    and covers everything until the run is written: start-up, data, the evaluations, the
    final TTA and the report."""
    dist = distributed.from_env()
    if resume is None and distributed.restart_count() > 0:
        # torchrun's elastic agent restarted this job's workers (a rank died, a machine
        # left): the same command again, so the run continues from its run folder.
        wanted = config if config is not None else make_config(**overrides)
        resume, note = resume_after_restart(wanted, dist)
        if resume is not None:
            config, overrides = None, {"device": wanted.device, "plots": wanted.plots,
                                       "dist_timeout": wanted.dist_timeout}
        if note and dist.main:
            log(note)
    if (dataset is not None or on_epoch is not None) and (dist.enabled or (nproc or 1) > 1):
        raise SettingsError("train(dataset=..., on_epoch=...) trains in this process only; "
                            "drop nproc")
    if nproc is not None and not dist.enabled:
        if nproc < 1:
            raise SettingsError(f"--nproc must be at least 1, got {nproc}")
        if nproc > 1:
            return _launch(nproc, config, resume, progress, overrides)
    ckpt = None
    if resume is not None:  # every process reads the run folder (multi-node: shared storage)
        cfg, ckpt = resume_settings(Path(resume), config, overrides)
    else:
        cfg = config if config is not None else make_config(**overrides)
    runtime = select_runtime(cfg.device, dist.local_rank if dist.enabled else None, cfg.amp)
    if dist.enabled:
        check_processes(cfg, runtime.device, dist.local_world)
    if ckpt is None:
        preflight(cfg, check_out=dist.main)  # every setting checked before any data loads
    progress = interactive() if progress is None else progress
    with distributed.process_group(dist, runtime.device, cfg.dist_timeout):
        return _train(cfg, ckpt, resume, dist, runtime, log if dist.main else _silent,
                      progress and dist.main, dataset, on_epoch, started)


def resume_after_restart(cfg: Config, dist: distributed.Dist) -> tuple[Path | None, str]:
    """Where a restarted torchrun job resumes (its --out, when an epoch is saved there)
    and the line that says so."""
    restart = distributed.restart_count()
    if cfg.out is None:
        return None, (f"torchrun restarted the workers (restart {restart}), but without "
                      "--out this run cannot find its folder: it starts again in a new one")
    out = Path(cfg.out)
    epoch = last_saved_epoch(out) if out.is_dir() else None
    if epoch is None:
        clear_unstarted(out)  # the first attempt died before its first epoch was saved
        return None, (f"torchrun restarted the workers (restart {restart}) before an epoch "
                      f"was saved: starting {out} again")
    return out, (f"torchrun restarted the workers (restart {restart}): resuming {out} after "
                 f"epoch {epoch + 1} with {dist.world} process{'es' if dist.world > 1 else ''}")


def _silent(message: str) -> None:
    pass


def _train(cfg: Config, ckpt, resume, dist: distributed.Dist, runtime: Runtime, log,
           progress: bool, dataset: Dataset | None = None, on_epoch=None,
           started: float | None = None) -> TrainResult:
    run = build_run(cfg, ckpt, dist, runtime, dataset, started)
    cfg, ds, model, step = run.cfg, run.ds, run.model, run.step
    result = TrainResult(Path(resume) if resume else None, cfg)
    first_epoch, steps_done = 0, 0
    if ckpt is not None:
        steps_done = restore_training_state(ckpt["train_state"], model, step.optimizer,
                                            step.scheduler, step.ema, run.generator,
                                            runtime.device, step.scaler)
        first_epoch, result.metrics = ckpt["epoch"] + 1, list(ckpt["train_state"]["history"])
    with ExitStack() as stack:
        run_dir = distributed.on_main(dist, lambda: stack.enter_context(RunFolder(
            result.run_dir, cfg.out, f"{ds.name}-{cfg.model}", resume=ckpt is not None)))
        result.run_dir, run.info.run_dir = run_dir, str(run_dir)
        if ckpt is None and dist.main:
            write_config(run_dir, run.info)
        board = stack.enter_context(TensorBoard(run_dir, run.train_data.head(32))) \
            if cfg.tensorboard and dist.main else None
        for note in ds.notes:
            log(note)
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        where = f"{dist.world} process{'es' if dist.world > 1 else ''} ({backend}" \
            f"{', SyncBatchNorm' if cfg.sync_bn else ''}) on {runtime.device.type}" \
            if dist.enabled else f"on {runtime.device}"
        log(f"data: {ds.name}: {len(ds.train)} train, {len(ds.val)} {ds.val_name} images, "
            f"{len(ds.classes)} {'labels (multi-label)' if ds.multi_label else 'classes'}, "
            f"{ds.in_channels}×{ds.image_size[0]}×{ds.image_size[1]}")
        log(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters), "
            f"recipe {cfg.recipe}, " + ("a linear probe of its features, " if cfg.linear_probe
                                        else f"{cfg.epochs} epochs, ") +
            f"batch {cfg.batch_size}, {run.plan}, "
            f"{where}; run folder {run_dir}" + (f"; resuming after epoch {first_epoch - 1}"
                                                 if ckpt is not None else ""))
        final = result.final = _loop(run, result, first_epoch, steps_done, run_dir, log,
                                     progress, board, on_epoch)
        if run.cfg.epochs != cfg.epochs:  # a time budget re-planned the run
            result.config = run.cfg
            if dist.main:
                write_config(run_dir, run.info)
        if final is not None and dist.main:  # the pictures and report.html of the final model
            write_report(run_dir, evaluation=evaluation_record(
                final.confusion, final.loss, ds.classes, ds.source, ds.val_name, final.probs,
                ds.val.labels, final.thresholds),
                images=ds.val.images, labels=ds.val.labels, probs=final.probs,
                metrics=result.metrics, settings=run.info.to_dict(), pictures=cfg.plots,
                model=load(run_dir / "last.pt") if cfg.plots else None)
    key = _selected_by(ds)
    scored = evaluated(result.metrics, key)
    best, last = max(m[key] for m in scored), scored[-1]
    what = f"mAP {last[key]:.4f} (best {best:.4f}), accuracy {last['val_acc']:.4f}" \
        if key == "val_map" else f"accuracy {last[key]:.4f} (best {best:.4f})"
    log(f"done: {ds.val_name} {what} after {sum(m['seconds'] for m in result.metrics):.1f}s "
        f"of training; run saved in {result.run_dir}")
    return result


def _loop(run: Run, result: TrainResult, first_epoch: int, steps_done: int, run_dir: Path,
          log, progress: bool, board, on_epoch=None) -> EvalResult | None:
    """Per epoch: train, evaluate (every eval_every epochs and the last), save, log.
    Returns the final evaluation."""
    cfg, model, step, dist, runtime = run.cfg, run.model, run.step, run.dist, run.runtime
    wrap = wrapper(cfg, dist, runtime)
    net, trained = wrap(model), _trained_set(model)
    multi, key = run.ds.multi_label, _selected_by(run.ds)
    best = max((m[key] for m in evaluated(result.metrics, key)), default=-1.0)
    epoch, ev = first_epoch, None
    eval_cost = None  # under a time budget: the last evaluation and its checkpoint
    table = EpochTable(cfg.epochs, run.ds.val_name, top5=len(run.ds.classes) > 5 and not multi,
                       mean_ap=multi)
    try:
        while epoch < run.cfg.epochs:  # a time budget re-plans the epochs as it goes
            model.on_epoch(epoch, cfg)
            if dist.enabled:
                if _trained_set(model) != trained:
                    net, trained = wrap(model), _trained_set(model)  # fixed by DDP
                # Dropout draws its masks from the global generator: a stream of each
                # process's own, which a resume with any number of processes recreates.
                torch.manual_seed(hash((cfg.seed, epoch, dist.rank)) % 2**63)
            start = time.perf_counter()
            try:
                stats = linear_probe(model, run.train_data, mean=step.mean, std=step.std,
                                     runtime=runtime, batch_size=cfg.batch_size,
                                     progress=progress) if cfg.linear_probe else \
                    train_one_epoch(net, run.train_data, step, batch_size=cfg.batch_size,
                                    epoch=epoch, generator=run.generator, progress=progress,
                                    max_batches=run.total_steps - steps_done,
                                    epochs=run.cfg.epochs, drop_last=cfg.drop_last)
            except NonFiniteLoss as e:
                raise CnnkitError(f"training diverged: {e}; the checkpoints in {run_dir} "
                                  f"are from before it (try a lower --lr)") from None
            synchronize(runtime)
            seconds = time.perf_counter() - start
            lr = current_lr(step.scheduler, cfg.lr)
            trained_steps = min(run.steps_per_epoch, run.total_steps - steps_done)
            steps_done += trained_steps
            if run.budget is not None:
                pace = seconds / max(trained_steps, 1)
                if eval_cost is None:
                    eval_cost = run.budget.eval_estimate(pace, len(run.val_data),
                                                         cfg.batch_size)
                replan(run, pace, eval_cost, steps_done, epoch + 1)
                table.epochs = run.cfg.epochs
            eval_model = step.ema.module if step.ema is not None else model
            distributed.sync_buffers(dist, eval_model)
            start = time.perf_counter()
            # every eval_every epochs and the last, which alone has test-time augmentation
            last = steps_done >= run.total_steps or cfg.linear_probe
            row = dict(epoch=epoch, train_loss=stats.loss, train_acc=stats.accuracy,
                       seconds=seconds, val_seconds=0.0, lr=lr)
            if last or (epoch + 1) % (cfg.eval_every or 1) == 0:
                ev = evaluate_split(eval_model, run.val_data, mean=step.mean, std=step.std,
                                    runtime=runtime, num_classes=len(run.ds.classes),
                                    batch_size=cfg.eval_batch_size, tta=cfg.tta if last else 0,
                                    mirror=cfg.flip != "none", dist=dist, progress=progress)
                row.update(val_loss=ev.loss, val_acc=ev.accuracy,
                           val_seconds=time.perf_counter() - start,
                           **({"val_top5": ev.top5} if ev.top5 is not None else {}),
                           **({"val_map": ev.mean_ap} if ev.mean_ap is not None else {}))
            result.metrics.append(row)
            improved = key in row and row[key] > best
            best = max(best, row.get(key, best))
            if dist.main:
                # an epoch without an evaluation keeps the last one's thresholds
                thresholds = ev.thresholds if ev is not None else None
                save_epoch(run_dir, build_checkpoint(run.info, eval_model, epoch, row,
                                                     thresholds), improved,
                           training_state(model, step.optimizer, step.scheduler, step.ema,
                                          run.generator, runtime.device, steps_done,
                                          run.total_steps, result.metrics, step.scaler))
                if board is not None:
                    board.log(row, lr)
            if epoch == first_epoch:
                log(table.header())
            log(table.row(result.metrics, improved,
                          f"(tta {cfg.tta})" if cfg.tta and last else ""))
            if on_epoch is not None:
                on_epoch(dict(row, epochs=run.cfg.epochs))
            if key in row:
                eval_cost = time.perf_counter() - start
            if cfg.patience and key in row and \
                    _epochs_since_best(result.metrics, key) >= cfg.patience and not last:
                log(f"stopping early: {run.ds.val_name} {'mAP' if multi else 'accuracy'} has "
                    f"not improved for "
                    f"{cfg.patience} epochs (best {best:.4f}, kept in best.pt); train every "
                    "epoch without --patience")
                break
            epoch += 1
    except KeyboardInterrupt:
        saved = last_saved_epoch(run_dir)
        kept = (f"epoch {saved} is saved; resume with: cnnkit train --resume {run_dir}"
                if saved is not None else "no epoch had completed, so there is nothing "
                "to resume")
        error = Interrupted(f"training interrupted during epoch {epoch}; {kept}")
        error.echo = not dist.main  # every process was stopped; rank 0 says so
        raise error from None
    return ev


def _epochs_since_best(metrics: list[dict], key: str = "val_acc") -> int:
    """Epochs from the best evaluation to the last one."""
    scored = evaluated(metrics, key)
    return scored[-1]["epoch"] - max(scored, key=lambda m: m[key])["epoch"]


def _selected_by(ds: Dataset) -> str:
    """The metric that picks best.pt and --patience's epoch: accuracy, or for multi-label
    data mAP (its accuracy is at thresholds tuned to F1, which trades it away; mAP needs
    no threshold)."""
    return "val_map" if ds.multi_label else "val_acc"


def _trained_set(model) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def _launch(nproc: int, config, resume, progress, overrides) -> TrainResult:
    """`nproc` processes on this machine, each running train(), under torchrun's agent.
    The settings are checked here first, so a mistake is reported once, before any start."""
    if resume is not None:
        cfg, _ = resume_settings(Path(resume), config, overrides)
    else:
        cfg = config if config is not None else make_config(**overrides)
        preflight(cfg)
        config, overrides = cfg, {}
    check_processes(cfg, select_runtime(cfg.device, amp=cfg.amp).device, nproc)
    folder = resume or cfg.out
    hint = (f" (completed epochs are saved: resume with cnnkit train --resume {folder})"
            if folder else " (completed epochs are saved in the run folder: resume with "
            "cnnkit train --resume RUN)")
    return distributed.launch(nproc, _worker_train, config, resume, progress, overrides,
                              hint=hint)


def _worker_train(config, resume, progress, overrides) -> TrainResult:
    keep_freed_memory()  # a process of cnnkit's own, spawned to train: as the CLI's
    return train(config, resume=resume, progress=progress, **overrides)

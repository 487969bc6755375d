"""Everything a run needs before its first step, shared by `train` and `lr-find`: the
settings checked (`preflight`, `check_processes`, `resume_settings`), the data and the
freshly initialised model (`prepare`), the starting weights (`start_weights`), a time
budget turned into steps (`plan_steps`), and all of it put together (`build_run`)."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed
from .checkpoint import (RunInfo, as_checkpoint, is_checkpoint, load_weights, model_description,
                         read_run, read_weights_file)
from .config import Config, parse_widths
from .data import Dataset, check_multi_label, check_source, expected_input, load_dataset
from .device import Runtime, synchronize
from .engine import (TrainStep, balanced_weights, batch_order, to_device, train_one_epoch,
                     tta_passes)
from .errors import SettingsError
from .models import create_model, model_entry
from .optim import build_ema, build_optimizer, build_scheduler
from .recipes import fill_recipe_defaults, probe_image_size
from .runs import check_new_run_dir
from .transforms import Augment, channel_stats, to_input


def preflight(cfg: Config, check_out: bool = True) -> None:
    """Check what can be checked before loading data: the model, the data source, whether
    the images will be big enough for the model, the output folder and weights file."""
    model_entry(cfg.model)
    check_source(cfg.data)
    if cfg.multi_label:
        check_multi_label(cfg.data)
        check_multi_label_settings(cfg)
    channels, size = expected_input(cfg.data, cfg.image_size, cfg.channels)
    args = {"widths": parse_widths(cfg.width)} if cfg.width else {}
    model = create_model(cfg.model, num_classes=2, in_channels=channels, image_size=size,
                         **args).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except RuntimeError:
        raise SettingsError(f"images of {size}×{size} are too small for {cfg.model}; pass a "
                            "larger --image-size") from None
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise SettingsError("--tensorboard needs the tensorboard package: "
                                "pip install 'cnnkit[tensorboard]'") from None
    if cfg.weights and not Path(cfg.weights).is_file():
        raise SettingsError(f"--weights {cfg.weights}: no such file")
    if cfg.out is not None and check_out:  # (under DDP rank 0 may already have made it)
        check_new_run_dir(Path(cfg.out))


def check_multi_label_settings(cfg: Config) -> None:
    """Settings a multi-label run refuses: they assume one class per image. (Label
    smoothing is left out of the binary cross-entropy instead: it is on by default.)"""
    for flag, on in (("--balance", cfg.balance), ("--linear-probe", cfg.linear_probe)):
        if on:
            raise SettingsError(f"{flag} assumes one class per image; this data is "
                                f"multi-label: drop {flag}")


def start_weights(model, cfg: Config, ds: Dataset) -> None:
    """--pretrained (the model family's published weights, e.g. torchvision's ImageNet ones)
    or --weights FILE: a cnnkit checkpoint, a .safetensors file, or, for a model with a
    pretrained form, a state_dict as its family saves it."""
    entry = model_entry(cfg.model)
    if cfg.pretrained and not cfg.weights:
        model.load_pretrained(entry.pretrained_state(), f"the pretrained weights of {cfg.model}")
    if not cfg.weights:
        return
    raw = read_weights_file(cfg.weights)  # read once, whichever form it holds
    if entry.pretrained_state is not None and isinstance(raw, dict) and not is_checkpoint(raw):
        model.load_pretrained(raw, cfg.weights)
        return
    load_weights(model, as_checkpoint(raw, cfg.weights),
                 model_description(cfg.model, len(ds.classes), ds.in_channels, ds.image_size),
                 cfg.weights)


def pretrained_form(cfg: Config) -> bool:
    """Whether the run starts from the model family's pretrained weights: --pretrained, or
    --weights holding a state_dict as torchvision or timm save them (its offline form)."""
    if model_entry(cfg.model).pretrained_info is None:
        return False
    return cfg.pretrained or bool(cfg.weights) and not is_checkpoint(
        read_weights_file(cfg.weights))


def input_settings(cfg: Config) -> tuple[Config, tuple | None]:
    """The image size and (mean, std) that the starting weights bring, unless given: a
    model family's pretrained weights', or a cnnkit checkpoint's own (its model learnt on
    images so normalized: a probe's head, fine-tuned with --weights RUN/best.pt, still
    fits the features)."""
    if cfg.weights and is_checkpoint(raw := read_weights_file(cfg.weights)):
        info = RunInfo.from_dict(as_checkpoint(raw, cfg.weights))
        if info.config.model != cfg.model or not info.config.normalize or not cfg.normalize:
            return cfg, None  # load_weights names a model mismatch
        size = cfg.image_size or info.input_size[0]
        return dataclasses.replace(cfg, image_size=size), (info.mean, info.std)
    if not pretrained_form(cfg):
        return cfg, None
    info = model_entry(cfg.model).pretrained_info()
    size = cfg.image_size or (probe_image_size(info["image_size"]) if cfg.linear_probe
                              else info["image_size"])
    return dataclasses.replace(cfg, image_size=size), (info["mean"], info["std"])


def load_data(cfg: Config) -> Dataset:
    """cfg.data as a run with these settings sees it: its splits, size and channels."""
    return load_dataset(cfg.data, data_dir=cfg.data_dir, image_size=cfg.image_size,
                        val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict,
                        stream=True if cfg.stream else None, max_memory=cfg.max_memory,
                        channels=cfg.channels, multi_label=cfg.multi_label)


def prepare(cfg: Config, runtime: Runtime, dataset: Dataset | None = None):
    """The data and the freshly initialised model a run with these settings trains:
    (config with the recipe's open settings filled, dataset, model, model args, mean, std).
    A `dataset` already loaded (e.g. one fold of `cnnkit doctor`) replaces cfg.data's."""
    given = cfg
    cfg, norm = input_settings(cfg)
    ds = dataset or load_data(cfg)
    if ds.multi_label:
        check_multi_label_settings(cfg)
    # the saved config says whether the run is multi-label, flag or not
    cfg = dataclasses.replace(cfg, multi_label=ds.multi_label)
    cfg = fill_recipe_defaults(cfg, len(ds.train), runtime.device.type, ds.image_size,
                               pretrained=pretrained_form(cfg), channels=ds.in_channels)
    if cfg.linear_probe and given.linear_probe is None and given.image_size is None and \
            dataset is None:
        # A probe chosen by default (the data turned out small: only pretrained weights get
        # one) reads larger images than fine-tuning would: decode the (fewer than
        # PROBE_BELOW) images again at its size.
        weights_size = model_entry(cfg.model).pretrained_info()["image_size"]
        cfg = dataclasses.replace(cfg, image_size=probe_image_size(weights_size))
        ds = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model_args = {"widths": list(parse_widths(cfg.width))} if cfg.width else {}
    model = create_model(cfg.model, num_classes=len(ds.classes), in_channels=ds.in_channels,
                         image_size=ds.image_size, **model_args)
    mean, std = channel_stats(ds.train.head(50_000)) if cfg.normalize else \
        ([0.0] * ds.in_channels, [1.0] * ds.in_channels)
    if norm is not None and len(norm[0]) == ds.in_channels:
        mean, std = norm
    model.init_from_data(to_input(ds.train.head(10_000), mean, std))
    return cfg, ds, model, model_args, mean, std


# What a run spends after its final evaluation: the report's pictures (2 s here, with
# matplotlib's import) or its page alone, and the process' exit. A time budget keeps it in
# hand (benchmarks/RESULTS.md section 23).
AFTER_SECONDS = {True: 2.5, False: 0.5}


@dataclass
class Budget:
    """A time budget for the whole command: `seconds` from `started` (a time.perf_counter()
    reading: the process' start under the CLI, train()'s call otherwise). Besides training
    steps it pays for what already ran (start-up, data, the plan), the evaluations (after
    every `eval_every` epochs and the last), the final one's test-time augmentation, the
    report and the exit."""
    seconds: float
    started: float
    eval_passes: int   # forward passes of each image in the final evaluation (TTA)
    after: float       # the report and the exit, in seconds
    eval_every: int = 1

    def left(self, eval_seconds: float) -> float:
        """Seconds left for training epochs, each with its evaluation: the budget less what
        has run, the final evaluation's extra passes (TTA), the report and the exit; 1% kept
        in hand for the noise of the paces these are reckoned from."""
        return (0.99 * self.seconds - (time.perf_counter() - self.started)
                - eval_seconds * (self.eval_passes - 1) - self.after)

    def steps_that_fit(self, pace: float, eval_seconds: float, steps_per_epoch: int,
                       due: float = 0.0) -> int:
        """Training steps that fit in what is left at `pace` seconds a step, with the
        evaluations of `eval_seconds` to come: one every `eval_every` epochs and the final
        one; `due`, seconds owed first (an evaluation about to run)."""
        e, k = eval_seconds, self.eval_every
        left = self.left(e) - due
        # N more epochs evaluate about (N - 1) / k times, then once at the end
        steps = int((left - e + e / k) / (pace + e / (steps_per_epoch * k)))
        if steps < steps_per_epoch:  # one more, short epoch: it pays the final evaluation
            steps = int((left - e) / pace)
        return max(0, steps)

    @staticmethod
    def eval_estimate(pace: float, val_images: int, batch_size: int) -> float:
        """An evaluation's seconds before one is measured: a forward pass of each
        validation image, reckoned a third of a training step's cost per image."""
        return pace * val_images / batch_size / 3

    @classmethod
    def of(cls, cfg: Config, started: float | None) -> "Budget | None":
        if cfg.time_budget is None:
            return None
        return cls(cfg.time_budget, time.perf_counter() if started is None else started,
                   tta_passes(cfg.tta, cfg.flip != "none"), AFTER_SECONDS[bool(cfg.plots)],
                   cfg.eval_every or 1)


def plan_steps(model, wrap, data, cfg: Config, augment, mean, std, runtime: Runtime,
               steps_per_epoch: int, budget: Budget, val_images: int,
               dist: distributed.Dist = distributed.SINGLE) -> tuple[int, str]:
    """How many optimizer steps fit in the time budget, from the time of a few steps of the
    first epoch measured on throw-away copies of the model and optimizer (the run itself is
    untouched). Only a first plan: every epoch re-plans at its own pace (`replan`), so a
    later phase that trains more or less (fastnet's whitening bias, a frozen backbone) is
    not timed here, and the few seconds it would take stay in the budget. Under DDP every
    process times its steps (communication included) and rank 0's plan is everyone's."""
    trial = copy.deepcopy(model)
    optimizer = build_optimizer(trial, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    step = TrainStep(optimizer, scheduler, augment, mean, std, runtime, cfg.label_smoothing,
                     dist=dist, scaler=runtime.grad_scaler())
    kw = dict(batch_size=cfg.batch_size, epoch=0, generator=generator,
              drop_last=cfg.drop_last)
    trial.on_epoch(0, cfg)
    net = wrap(trial)
    train_one_epoch(net, data, step, max_batches=1, **kw)  # warm-up: kernels are set up
    synchronize(runtime)
    n = min(2, steps_per_epoch)
    start = time.perf_counter()
    train_one_epoch(net, data, step, max_batches=n, **kw)
    synchronize(runtime)
    pace = (time.perf_counter() - start) / n
    eval_seconds = Budget.eval_estimate(pace, val_images, cfg.batch_size)
    total = max(1, budget.steps_that_fit(pace, eval_seconds, steps_per_epoch))
    return distributed.broadcast(dist, (total, (
        f"time budget {budget.seconds:g}s (the whole command) at {pace * 1000:.0f} ms/step: "
        f"{total} steps")))


def replan(run: "Run", pace: float, eval_seconds: float, steps_done: int,
           epochs_done: int) -> int:
    """A time budget re-planned after an epoch's training, at the pace of that epoch and
    the cost of the last evaluation (and checkpoint): the steps that fit in what is left of
    the whole command, so the run ends close to the budget and not after it. The schedule
    stretches or shrinks to the new end. Rank 0's plan is everyone's."""
    # this epoch's evaluation, if it has one, is still to come
    due = eval_seconds if epochs_done % run.budget.eval_every == 0 else 0.0
    steps = run.budget.steps_that_fit(pace, eval_seconds, run.steps_per_epoch, due)
    total = distributed.broadcast(run.dist, steps_done + steps)
    run.total_steps = total
    for schedule in run.step.scheduler.lr_lambdas:
        schedule.total = total
    # counted from the epochs trained: a short epoch may have ended the last plan
    epochs = epochs_done + -(-(total - steps_done) // run.steps_per_epoch)
    run.cfg = run.info.config = dataclasses.replace(run.cfg, epochs=epochs)
    return total


def check_processes(cfg: Config, device: torch.device, per_machine: int) -> None:
    """Settings that depend on how many processes train, checked before any start."""
    if cfg.sync_bn and device.type != "cuda":
        raise SettingsError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on "
                            "the CPU; drop it")
    if device.type == "cuda" and per_machine > torch.cuda.device_count():
        raise SettingsError(f"{per_machine} processes on a machine with "
                            f"{torch.cuda.device_count()} GPU(s): start one process per GPU")


def resume_settings(run_dir: Path, config, overrides: dict) -> tuple[Config, dict]:
    """The settings and last checkpoint of a run to resume. Where it runs and whether it
    draws its pictures may change (--device, --dist-timeout, --plots); what it trains may
    not."""
    free = ("device", "dist_timeout", "plots")
    given = [k for k, v in overrides.items() if v is not None and k not in free]
    if config is not None or given:
        raise SettingsError(f"--resume continues a run with its own settings; drop "
                            f"{', '.join('--' + k.replace('_', '-') for k in given) or 'the config'}")
    info, ckpt = read_run(run_dir)
    cfg = dataclasses.replace(info.config, data=info.data_source or info.config.data,
                              **{k: overrides[k] for k in free
                                 if overrides.get(k) is not None})
    return cfg, ckpt


@dataclass
class Run:
    """A run's parts, built once before the first epoch (the training loop's state)."""
    cfg: Config
    info: RunInfo
    ds: Dataset
    model: nn.Module
    train_data: object
    val_data: object
    step: TrainStep
    generator: torch.Generator  # the epoch orders and augmentation: the same on every process
    steps_per_epoch: int
    total_steps: int
    plan: str
    dist: distributed.Dist
    runtime: Runtime
    budget: Budget | None = None  # a time budget, re-planned after each epoch


def build_run(cfg: Config, ckpt: dict | None, dist, runtime: Runtime,
              dataset: Dataset | None = None, started: float | None = None) -> Run:
    """`started`: the time.perf_counter() a time budget counts from (default: now)."""
    cfg, ds, model, model_args, mean, std = prepare(cfg, runtime, dataset)
    if ckpt is None:
        start_weights(model, cfg, ds)
    if dist.enabled and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(runtime.device, memory_format=runtime.memory_format)
    train_data, val_data = to_device(ds.train, runtime, dist), to_device(ds.val, runtime, dist)
    per_epoch = len(batch_order(len(train_data), cfg.batch_size, torch.Generator(), dist.world,
                                cfg.drop_last))
    augment = Augment.from_config(cfg, mean, std)
    budget = Budget.of(cfg, started) if ckpt is None else None  # a resume keeps its plan
    if ckpt is not None:
        total = ckpt["train_state"]["total_steps"]
        plan = f"{total} steps"
    elif budget is not None:
        total, plan = plan_steps(model, wrapper(cfg, dist, runtime), train_data, cfg, augment,
                                 mean, std, runtime, per_epoch, budget, len(val_data), dist)
        cfg = dataclasses.replace(cfg, epochs=-(-total // per_epoch))
    else:
        total = cfg.epochs * per_epoch
        plan = f"{total} steps"
    optimizer = build_optimizer(model, cfg)
    weights = balanced_weights(train_data.labels, len(ds.classes)).to(runtime.device) \
        if cfg.balance else None
    step = TrainStep(optimizer, build_scheduler(optimizer, cfg, total), augment, mean, std,
                     runtime, cfg.label_smoothing, weights, cfg.seed, dist,
                     build_ema(model, cfg.ema), scaler=runtime.grad_scaler())
    info = RunInfo.of_run(cfg, ds, mean, std, model_args, processes=dist.world)
    return Run(cfg, info, ds, model, train_data, val_data, step,
               torch.Generator().manual_seed(cfg.seed), per_epoch, total, plan, dist, runtime,
               budget)


def wrapper(cfg: Config, dist: distributed.Dist, runtime: Runtime):
    """What the training loop calls for a module: under DDP a DistributedDataParallel of
    it, compiled if asked."""
    def wrap(module):
        net = distributed.ddp(module, dist, runtime.device)
        return torch.compile(net) if cfg.compile else net
    return wrap

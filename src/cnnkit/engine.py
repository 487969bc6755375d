"""Train one epoch and evaluate, over data held as uint8 tensors on the training device.

Batches are indexed straight out of the tensor in a seeded order and augmented as whole
batches: no DataLoader, no per-image Python in the loop. A data set too big for memory
(data.StreamSplit) gives the same batches from DataLoader workers instead.

Under DDP (distributed.Dist) every process draws the same order and augmentation and
trains on its share of each global batch; evaluation splits the batches between the
processes and gathers the results, which equal a single process's exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from .data import Split
from . import distributed
from .device import Runtime
from .distributed import SINGLE, Dist
from .metrics import (accuracy, best_thresholds, confusion_matrix, label_scores,
                      mean_average_precision, top_k_accuracy)
from .progress import bar
from .transforms import Augment, to_input


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class EpochStats:
    loss: float
    accuracy: float


def batch_order(n: int, batch_size: int, generator: torch.Generator, world: int = 1,
                drop_last: bool = False) -> list[torch.Tensor]:
    """A fresh shuffled order split into batches. A trailing batch smaller than the others
    is dropped with `drop_last` (every step then costs the same: the fast recipe), and
    always when too small to give each process two images: BatchNorm cannot normalize a
    single sample."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and (len(batches[-1]) < 2 * world or
                             drop_last and len(batches[-1]) < batch_size):
        batches.pop()
    return batches


@dataclass
class TrainStep:
    """What every optimizer step of a run uses, built once: `train_one_epoch` and the
    lr range test both step through `train_step` with it."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: Augment
    mean: list[float]
    std: list[float]
    runtime: Runtime
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    seed: int = 0
    dist: Dist = SINGLE
    ema: nn.Module | None = None
    ema_every: int = 5
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast (Runtime.grad_scaler)


def train_step(model: nn.Module, s: TrainStep, batch: torch.Tensor, index: torch.Tensor,
               images: torch.Tensor, y: torch.Tensor, *, epoch: int,
               generator: torch.Generator, batch_labels: torch.Tensor | None = None) -> tuple:
    """One optimizer step on this process's share (index, images, y) of the global batch
    `batch`: augment, forward, loss, backward, step. With class weights, `batch_labels`
    are the global batch's labels. Returns the global-batch mean loss and this share's
    logits, both detached."""
    device = s.runtime.device
    x = to_input(images, s.mean, s.std)
    if s.augment.active:
        # Drawn for the whole global batch on every process, so the random stream (and
        # the run) is the same whatever the number of processes.
        draws = s.augment.sample(len(batch), x.shape[2:], generator_for(generator, device),
                                 device)
        if s.dist.enabled:
            rows = s.dist.share(torch.arange(len(batch), device=device))
            draws = {k: v[rows] for k, v in draws.items()}
        x = s.augment.apply(x, index, epoch, draws, s.seed)
    x = x.contiguous(memory_format=s.runtime.memory_format)
    with torch.autocast(device.type, dtype=s.runtime.dtype, enabled=s.runtime.autocast):
        logits = model(x)
        if y.ndim == 2:  # multi-label: a binary cross-entropy per label, summed over them
            loss_sum = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum")
        else:
            loss_sum = F.cross_entropy(logits.float(), y, weight=s.class_weights,
                                       label_smoothing=s.label_smoothing, reduction="sum")
    # The mean over the global batch. DDP averages gradients over the processes, so
    # each process's part is scaled by their number: the step equals one process's.
    total = len(batch) if s.class_weights is None else \
        s.class_weights[batch_labels.to(device)].sum()
    loss = loss_sum / total * s.dist.world
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is None:
        loss.backward()
        s.optimizer.step()
    else:  # a step whose scaled gradients overflowed is skipped, and the scale lowered
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.scheduler.step()
    return loss.detach() / s.dist.world, logits.detach()


def train_one_epoch(model: nn.Module, data: Split, s: TrainStep, *, batch_size: int,
                    epoch: int, generator: torch.Generator, max_batches: int | None = None,
                    progress: bool = False, epochs: int | None = None,
                    drop_last: bool = False) -> EpochStats:
    """One pass over `data` in a fresh seeded order (or its first `max_batches` batches,
    when a time budget ends the run mid-epoch). `batch_size` is the global batch: under DDP
    this process trains on its share of each one. `progress` draws a bar with the running
    loss (of this process's share), titled epoch `epoch + 1` of `epochs`."""
    model.train()
    device = s.runtime.device
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss × images, correct, images
    batches = batch_order(len(data), batch_size, generator, s.dist.world,
                          drop_last)[:max_batches]
    shares = [s.dist.share(b) for b in batches]
    stream = bar(data.iterate(shares, device), total=len(batches), unit="batch",
                 desc=f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""), enabled=progress)
    for step, (batch, (index, images, y)) in enumerate(zip(batches, stream)):
        loss, logits = train_step(model, s, batch, index, images, y, epoch=epoch,
                                  generator=generator, batch_labels=None if
                                  s.class_weights is None else data.labels[batch])
        if s.ema is not None and step % s.ema_every == s.ema_every - 1:
            s.ema.update_parameters(model)
        totals[0] += loss * len(batch)
        if y.ndim == 2:  # the share of right (image, label) calls at 0.5: accuracy_multi
            totals[1] += ((logits > 0) == (y > 0.5)).float().mean(1).sum()
        else:
            totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(index)
        # Checking waits for the GPU, so not at every step: a diverged run is caught within
        # 16 steps (the checkpoints are from the end of an earlier epoch).
        if step % 16 == 15 or step == len(batches) - 1:
            if not torch.isfinite(totals[0]):
                raise NonFiniteLoss(f"loss is {float(totals[0])} at epoch {epoch}, step {step}")
        if progress and step % 10 == 0:  # a running loss; .item() waits for the GPU: rarely
            stream.set_postfix(loss=f"{float(totals[0] / totals[2]):.4f}")
    stream.close()
    loss_total, correct, seen = distributed.all_sum(s.dist, totals).tolist()
    return EpochStats(loss_total / max(seen, 1), correct / max(seen, 1))


def to_device(split, runtime: Runtime, dist: Dist = SINGLE):
    """In-memory data moves to the training device once; streamed data stays on disk, and
    processes sharing a machine share its decoding workers."""
    if not isinstance(split, Split):
        return dataclasses.replace(split, workers=max(1, split.workers // dist.local_world)) \
            if dist.enabled else split
    return Split(split.images.to(runtime.device), split.labels.to(runtime.device))


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced data set gets weight 1 everywhere."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp_min(1))


def generator_for(cpu_generator: torch.Generator, device: torch.device) -> torch.Generator:
    """Augmentation randomness on the batch's device, derived from the epoch's CPU stream."""
    if device.type == "cpu":
        return cpu_generator
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(2**62, (1,), generator=cpu_generator)))
    return g


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: torch.Tensor | None  # (K, K): true class × predicted class; None multi-label
    probs: torch.Tensor       # (N, K) softmax (multi-label: sigmoid) probabilities, on the CPU
    top5: float | None = None  # with more than 5 classes
    mean_ap: float | None = None  # multi-label: mAP, over the labels present
    thresholds: list[float] | None = None  # multi-label: the per-label thresholds applied


def tta_logits(model: nn.Module, x: torch.Tensor, level: int, mirror: bool = True
               ) -> torch.Tensor:
    """Test-time augmentation: 0 none, 1 average with the mirror image, 2 also with
    1-pixel translations (up-left and down-right) of both. Without `mirror` (a model trained
    without flips, where left and right may mean different classes) no view is mirrored."""
    def views(z):
        return 0.5 * (model(z) + model(z.flip(3))) if mirror else model(z)
    if level == 0:
        return model(x)
    logits = views(x)
    if level == 1:
        return logits
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[2:]
    shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    moved = sum(views(s) for s in shifted) / len(shifted)
    return 0.5 * logits + 0.5 * moved


def tta_passes(level: int, mirror: bool = True) -> int:
    """Forward passes of each image that `tta_logits` makes at `level`."""
    return {0: 1, 1: 2, 2: 6}[level] if mirror else {0: 1, 1: 1, 2: 3}[level]


@torch.no_grad()
def linear_probe(model: nn.Module, data: Split, *, mean, std, runtime: Runtime,
                 batch_size: int, progress: bool = False, c: float = 1.0) -> EpochStats:
    """Fit the classifier alone: the features of every training image, computed once in
    eval mode and without augmentation, then an L2-regularised multinomial logistic
    regression on them (scikit-learn's lbfgs, C=`c`, on standardized features, as CLIP's
    linear probes do); its weights are written into the model's classifier."""
    from sklearn.linear_model import LogisticRegression  # only here: it is slow to import
    f = embed(model, data, mean=mean, std=std, runtime=runtime, batch_size=batch_size,
              progress=progress).double()
    y = data.labels.cpu()
    mu, sigma = f.mean(0), f.std(0).clamp_min(1e-6)
    z = ((f - mu) / sigma).numpy()
    fit = LogisticRegression(C=c, max_iter=2000).fit(z, y.numpy())
    coef = torch.as_tensor(fit.coef_, dtype=torch.float64)
    intercept = torch.as_tensor(fit.intercept_, dtype=torch.float64)
    if len(fit.classes_) == 2:
        # sklearn's binary form is one row, the second class's log-odds: split it evenly
        # between the two logits (softmax sees the same difference), so each class's logit
        # carries its evidence (Grad-CAM of the first class would otherwise find none)
        coef, intercept = torch.cat([-coef / 2, coef / 2]), \
            torch.cat([-intercept / 2, intercept / 2])
    head = model.get_classifier()
    # built on the CPU beside scikit-learn's arrays, then copied to the model's device
    weight = torch.zeros(head.weight.shape, dtype=torch.float64)
    bias = torch.full(head.bias.shape, -30.0, dtype=torch.float64)  # classes never seen
    rows = torch.as_tensor(fit.classes_, dtype=torch.long)
    weight[rows], bias[rows] = coef / sigma, intercept - (coef * mu / sigma).sum(1)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    probs = torch.as_tensor(fit.predict_proba(z))
    loss = float(F.nll_loss(probs.clamp_min(1e-12).log(), torch.searchsorted(rows, y)))
    return EpochStats(loss, float((rows[probs.argmax(1)] == y).double().mean()))


@torch.inference_mode()
def evaluate_split(model: nn.Module, data: Split, *, mean, std, runtime: Runtime, num_classes: int,
             batch_size: int = 500, tta: int = 0, mirror: bool = True,
             dist: Dist = SINGLE, progress: bool | None = None,
             thresholds: list[float] | None = None) -> EvalResult:
    """Loss, accuracy, confusion matrix and probabilities over `data`. Under DDP the
    processes take turns at the batches and share their results: each batch is computed
    as one process would, and summed in the same order, so the result is the same.
    Multi-label data (labels (N, K)) gets sigmoid probabilities, the binary cross-entropy,
    mAP, and the accuracy of its (image, label) calls at `thresholds`; without them, at the
    thresholds of the best F1 per label on `data`, which training saves with the model."""
    model.eval()
    multi = data.labels.ndim == 2
    batches = torch.arange(len(data)).split(batch_size)
    mine = batches[dist.rank::dist.world]
    probs, losses = [], []
    for _, images, y in bar(data.iterate(mine, runtime.device), total=len(mine),
                            desc="evaluating", unit="batch", enabled=progress):
        x = to_input(images, mean, std, memory_format=runtime.memory_format)
        with torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.autocast):
            logits = tta_logits(model, x, tta, mirror).float()
        if multi:
            losses.append(float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum")))
            probs.append(logits.sigmoid().cpu())
        else:
            losses.append(float(F.cross_entropy(logits, y, reduction="sum")))
            probs.append(logits.softmax(1).cpu())
    if dist.enabled:  # batch i was computed by rank i % world
        parts = distributed.gather(dist, (probs, losses))
        order = [(i % dist.world, i // dist.world) for i in range(len(batches))]
        probs = [parts[r][0][j] for r, j in order]
        losses = [parts[r][1][j] for r, j in order]
    probs = torch.cat(probs) if probs else torch.zeros(0, num_classes)
    labels = data.labels.cpu()
    if multi:
        thresholds = list(thresholds) if thresholds is not None else \
            best_thresholds(probs, labels)
        return EvalResult(sum(losses) / max(len(data), 1),
                          label_scores(probs, labels, thresholds)["accuracy"], None, probs,
                          mean_ap=mean_average_precision(probs, labels)[0],
                          thresholds=thresholds)
    confusion = confusion_matrix(probs.argmax(1), labels, num_classes)
    return EvalResult(sum(losses) / max(len(data), 1), accuracy(confusion), confusion, probs,
                      top_k_accuracy(probs, labels, 5) if num_classes > 5 else None)


@torch.inference_mode()
def embed(model: nn.Module, data: Split, *, mean, std, runtime: Runtime,
          batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """Penultimate features (N, D), float32 on the CPU: what the model's classifier layer is
    given, for any model of the contract, whatever its body and pooling. In full precision
    (no autocast): the features are fitted to (`linear_probe`) and compared (doctor)."""
    model.eval()
    captured = []
    hook = model.get_classifier().register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].float().flatten(1).cpu()))
    batches = torch.arange(len(data)).split(batch_size)
    try:
        for _, images, _ in bar(data.iterate(batches, runtime.device), total=len(batches),
                                desc="features", unit="batch", enabled=progress):
            model(to_input(images, mean, std, memory_format=runtime.memory_format))
    finally:
        hook.remove()
    return torch.cat(captured)

"""Train one epoch and evaluate, over data held as uint8 tensors on the training device.

Batches are indexed straight out of the tensor in a seeded order and augmented as whole
batches: no DataLoader, no per-image Python in the loop. A data set too big for memory
(data.StreamSplit) gives the same batches from DataLoader workers instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Split
from .device import Runtime
from .metrics import accuracy, confusion_matrix
from .transforms import Augment, to_input


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class EpochStats:
    loss: float
    accuracy: float


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh shuffled order split into batches. A trailing batch of one image is dropped:
    BatchNorm cannot normalize a single sample."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def train_one_epoch(model: nn.Module, data: Split, *, optimizer: torch.optim.Optimizer,
                    scheduler, batch_size: int, epoch: int, generator: torch.Generator,
                    augment: Augment, mean, std, runtime: Runtime, label_smoothing: float = 0.0,
                    seed: int = 0, progress: bool = False, ema=None, ema_every: int = 5,
                    max_batches: int | None = None,
                    class_weights: torch.Tensor | None = None) -> EpochStats:
    """One pass over `data` in a fresh seeded order (or its first `max_batches` batches,
    when a time budget ends the run mid-epoch)."""
    model.train()
    device = runtime.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    batches = batch_order(len(data), batch_size, generator)[:max_batches]
    stream = tqdm(data.iterate(batches, device), total=len(batches), desc=f"epoch {epoch}",
                  leave=False, disable=not progress, unit="batch")
    for step, (index, images, y) in enumerate(stream):
        x = to_input(images, mean, std)
        if augment.active:
            x = augment(x, index, epoch, generator_for(generator, device), seed)
        x = x.contiguous(memory_format=runtime.memory_format)
        with torch.autocast(device.type, dtype=runtime.dtype, enabled=runtime.autocast):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=class_weights,
                                   label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None and step % ema_every == ema_every - 1:
            ema.update_parameters(model)
        total_loss += loss.detach() * len(index)
        correct += (logits.argmax(1) == y).sum()
        seen += len(index)
    return EpochStats(float(total_loss) / max(seen, 1), float(correct) / max(seen, 1))


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
    confusion: torch.Tensor   # (K, K): true class × predicted class
    probs: torch.Tensor       # (N, K) softmax probabilities, on the CPU


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


@torch.inference_mode()
def evaluate(model: nn.Module, data: Split, *, mean, std, runtime: Runtime, num_classes: int,
             batch_size: int = 500, tta: int = 0, mirror: bool = True) -> EvalResult:
    model.eval()
    probs, total_loss = [], 0.0
    for _, images, y in data.iterate(torch.arange(len(data)).split(batch_size), runtime.device):
        x = to_input(images, mean, std, memory_format=runtime.memory_format)
        with torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.autocast):
            logits = tta_logits(model, x, tta, mirror).float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(logits.softmax(1).cpu())
    probs = torch.cat(probs) if probs else torch.zeros(0, num_classes)
    confusion = confusion_matrix(probs.argmax(1), data.labels.cpu(), num_classes)
    return EvalResult(total_loss / max(len(data), 1), accuracy(confusion), confusion, probs)

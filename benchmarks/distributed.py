"""Training throughput with 1 process against N processes (DDP), side by side in one run:
images/s of the training epochs (evaluation excluded), each configuration run `--repeats`
times in alternation so machine noise falls on both alike.

    python benchmarks/distributed.py [--data PATH] [--models fastnet seed-cnn]
        [--recipe fast] [--nproc 2] [--epochs 4] [--repeats 2] [--device cpu|cuda] [--out FILE.json]

On the CPU the N processes share the machine's cores (each gets cores/N threads; one
process gets all of them), so this measures what DDP costs or gains on one machine. On
GPUs, N is the number of GPUs and 1 is one GPU. Epoch 0 (warm-up, first allocations)
is left out of the rate.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cnnkit


def measure(data: str, model: str, recipe: str, nproc: int, epochs: int, device: str,
            out: Path) -> dict:
    result = cnnkit.train(data=data, model=model, recipe=recipe, epochs=epochs,
                          device=device, tta=0,
                          val_fraction=0.2, seed=0, out=str(out), nproc=nproc,
                          log=lambda s: None, progress=False)
    meta = json.loads((out / "config.json").read_text())
    timed = result.metrics[1:]
    images = meta["num_train"] * len(timed)
    seconds = sum(m["seconds"] for m in timed)
    return {"model": model, "recipe": recipe, "processes": nproc, "images_per_s": images / seconds,
            "epoch_seconds": [round(m["seconds"], 3) for m in timed],
            "val_acc": result.metrics[-1]["val_acc"], "batch_size": meta["batch_size"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                         "data" / "cifar10-subset" / "cifar-10-batches-py"))
    p.add_argument("--models", nargs="+", default=["fastnet", "seed-cnn"])
    p.add_argument("--recipe", default="fast")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for r in range(args.repeats):
                for nproc in (1, args.nproc):
                    row = measure(args.data, model, args.recipe, nproc, args.epochs,
                                  args.device,
                                  Path(tmp) / f"{model}-{nproc}-{r}")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.device}, recipe {args.recipe}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | processes | batch (global) | images/s (median of runs) | runs | "
          f"ratio to 1 process | val acc after {args.epochs} epochs |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        base = None
        for nproc in (1, args.nproc):
            mine = [r for r in rows if r["model"] == model and r["processes"] == nproc]
            rate = statistics.median(r["images_per_s"] for r in mine)
            base = base or rate
            runs = ", ".join(f"{r['images_per_s']:,.0f}" for r in mine)
            accs = ", ".join(f"{r['val_acc']:.3f}" for r in mine)
            print(f"| {model} | {nproc} | {mine[0]['batch_size']} | {rate:,.0f} | {runs} | "
                  f"{rate / base:.2f} | {accs} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

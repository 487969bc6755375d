"""Training images/s of a torchvision model at 224×224 on the CPU: images decoded once and
held in memory, against images streamed from disk (decoded and resized per batch in
DataLoader workers). Both runs in one process, one after the other.

    python benchmarks/streaming.py [--data ../shared/data/cifar10-png-sample]
        [--model tv:resnet18] [--size 224] [--epochs 3] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cnnkit

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" /
                                         "cifar10-png-sample"))
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    print("| loader | epochs timed | images | seconds | images/s |")
    print("|---|---|---|---|---|")
    for stream in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            r = cnnkit.train(data=a.data, model=a.model, image_size=a.size, epochs=a.epochs,
                             batch_size=a.batch_size, stream=stream, tta=0, seed=0,
                             out=f"{tmp}/run", log=lambda s: None, progress=False)
            per_epoch = json.loads((r.run_dir / "config.json").read_text())["num_train"]
        timed = r.metrics[1:]  # the first epoch warms up
        n = len(timed) * per_epoch
        secs = sum(m["seconds"] for m in timed)
        print(f"| {'streamed' if stream else 'in memory'} | {len(timed)} | {n} | "
              f"{secs:.1f} | {n / secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()

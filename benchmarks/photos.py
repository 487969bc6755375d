"""From scratch on real photos: hymenoptera (245 training, 153 validation photos of ants and
bees), no pretrained weights. Each configuration (recipe, augmentation preset, image size,
time budget) trained with --seeds seeds; validation accuracy and training seconds.

    python benchmarks/photos.py [--seeds 0 1 2] [--only NAME ...] [--json FILE]
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

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hymenoptera"

CONFIGS = {
    "fast, cifar aug, 64 px, batch 256": dict(augment="cifar", image_size=64, batch_size=256),
    "fast, photo aug, 64 px, batch 256": dict(augment="photo", image_size=64, batch_size=256),
    "fast, cifar aug, 64 px, batch 32": dict(augment="cifar", image_size=64, batch_size=32),
    "fast, photo aug, 64 px, batch 32": dict(augment="photo", image_size=64, batch_size=32),
    "fast, photo aug, 96 px, batch 32": dict(augment="photo", image_size=96, batch_size=32),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", help="configuration names (default: all)")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in CONFIGS.items():
            if a.only and name not in a.only:
                continue
            accs, secs = [], []
            for seed in a.seeds:
                r = cnnkit.train(data=str(DATA), seed=seed, out=f"{tmp}/{len(rows)}-{seed}",
                                 log=lambda s: None, **settings)
                accs.append(r.metrics[-1]["val_acc"])
                secs.append(sum(m["seconds"] for m in r.metrics))
                print(f"{name} seed {seed}: {accs[-1]:.4f} in {secs[-1]:.1f} s "
                      f"({r.config.epochs} epochs, width {r.config.width})", flush=True)
            rows.append({"config": name, "settings": settings, "seeds": a.seeds,
                         "val_acc": accs, "seconds": secs,
                         "mean_val_acc": statistics.mean(accs),
                         "mean_seconds": statistics.mean(secs)})
    print("| configuration | val accuracy (mean) | per seed | training s (mean) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['mean_val_acc']:.1%} | "
              f"{' / '.join(f'{x:.1%}' for x in r['val_acc'])} | {r['mean_seconds']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

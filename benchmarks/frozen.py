"""What fine-tuning's first phase costs: one epoch of tv:resnet18 at 224 on hymenoptera
(245 training photos) with the backbone frozen, the same epoch with everything training,
and `--linear-probe` (features once, then a logistic regression), alternating, the median
of --rounds. Weights: a state_dict saved from torchvision's untrained resnet18 (no
pretrained weights can be downloaded here; the cost does not depend on their values).

    python benchmarks/frozen.py [--rounds 2] [--json benchmarks/frozen.json]
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
import torchvision

import cnnkit

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hymenoptera"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "w.pth"
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(a.model[3:]).state_dict(), weights)
        kinds = {"unfrozen epoch": dict(freeze_epochs=0, epochs=1),
                 "frozen epoch": dict(freeze_epochs=1, epochs=1),
                 "linear probe": dict(linear_probe=True)}
        seconds = {k: [] for k in kinds}
        accuracy = {}
        for r in range(a.rounds):
            for kind, settings in kinds.items():
                result = cnnkit.train(data=str(DATA), model=a.model, image_size=224,
                                      weights=str(weights), out=str(tmp / f"{kind}-{r}"),
                                      seed=0, log=lambda s: None, **settings)
                seconds[kind].append(result.metrics[0]["seconds"])
                accuracy[kind] = result.metrics[0]["val_acc"]  # the same every round
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"# {a.model} at 224 on hymenoptera (245 training images), median of {a.rounds}")
    for k, v in median.items():
        print(f"{k:<16} {v:6.1f} s  {v / median['unfrozen epoch']:.2f} of an unfrozen epoch, "
              f"val accuracy after it {accuracy[k]:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__, "model": a.model,
            "seconds": seconds, "median": median, "val_acc": accuracy}, indent=1) + "\n")


if __name__ == "__main__":
    main()

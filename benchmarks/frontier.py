"""Accuracy against training time on the real CIFAR-10 subset (../shared/data), 20%
validation split, several seeds: the tutorial recipe, the previous default (fast-sgd), the
fast recipe and the fast recipe fitted to time budgets, and beside them, seed for seed on
the same split, the anchor: airbench94_muon (benchmarks/airbench94.py) at several epoch
counts. Writes a markdown table and benchmarks/frontier.png.

    python benchmarks/frontier.py [--seeds 0 1 2] [--budgets 10 30 60 120 300]
        [--anchor-epochs 4 8 12 16] [--data PATH] [--out benchmarks/frontier.json]

Run it alone on the machine: every number here is a wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

import cnnkit  # noqa: E402
from airbench94 import train_muon_anchor  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py"


def run(label: str, seed: int, data: str, **settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = cnnkit.train(data=data, val_fraction=0.2, seed=seed, out=f"{tmp}/run",
                         log=lambda s: None, progress=False, **settings)
    row = {"label": label, "seed": seed, "val_acc": r.metrics[-1]["val_acc"],
           "train_seconds": sum(m["seconds"] for m in r.metrics), "epochs": r.config.epochs,
           **settings}
    print(json.dumps(row), flush=True)
    return row


def run_anchor(label: str, seed: int, data: str, epochs: float, batch_size: int = 256,
               widths=(32, 128, 128)) -> dict:
    """airbench94_muon at the CPU widths and batch the issue measured it with, on the same
    split as cnnkit's runs of this seed; seconds are its whitening and training."""
    ds = cnnkit.load_dataset(data, val_fraction=0.2, seed=seed)
    r = train_muon_anchor(ds.train, ds.val, epochs=epochs, batch_size=batch_size,
                          widths=widths, seed=seed)
    row = {"label": label, "seed": seed, "val_acc": r["val_acc"],
           "train_seconds": r["train_seconds"], "epochs": epochs, "anchor": True}
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=float, default=[10, 30, 60, 120, 300])
    p.add_argument("--anchor-epochs", nargs="*", type=float, default=[4, 8, 12, 16])
    p.add_argument("--skip-tutorial", action="store_true")
    p.add_argument("--skip-fixed", action="store_true",
                   help="only the time budgets and the anchor (no fast-sgd, no fast)")
    p.add_argument("--out", default=str(HERE / "frontier.json"))
    a = p.parse_args()
    torch.set_num_threads(2)
    jobs = [] if a.skip_tutorial or a.skip_fixed else [("tutorial", dict(recipe="tutorial"))]
    if not a.skip_fixed:
        # the default before Muon: SGD, and fastnet at 32/128/128 on the CPU
        jobs.append(("fast-sgd (previous default)", dict(recipe="fast-sgd",
                                                         width="32,128,128")))
        jobs.append(("fast", dict(recipe="fast")))
    jobs += [(f"budget {b:g}s", dict(recipe="fast", time_budget=b)) for b in a.budgets]
    anchors = [(f"airbench94_muon {e:g} epochs", e) for e in a.anchor_epochs]
    rows = []
    for seed in a.seeds:  # seed for seed: each seed's points, the anchor's included, together
        rows += [run(label, seed, a.data, **settings) for label, settings in jobs]
        rows += [run_anchor(label, seed, a.data, e) for label, e in anchors]
    Path(a.out).write_text(json.dumps(rows, indent=2))
    jobs += [(label, {}) for label, _ in anchors]

    print("\n| recipe | val acc (mean of seeds) | per seed | training s (mean) | epochs |")
    print("|---|---|---|---|---|")
    summary = []
    for label, _ in jobs:
        rs = [r for r in rows if r["label"] == label]
        acc = statistics.mean(r["val_acc"] for r in rs)
        sec = statistics.mean(r["train_seconds"] for r in rs)
        summary.append((label, acc, sec))
        per_seed = " / ".join(f"{r['val_acc'] * 100:.1f}" for r in rs)
        print(f"| {label} | {acc * 100:.1f}% | {per_seed} | {sec:.1f} | {rs[0]['epochs']} |")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colour = {"tutorial": "C1", "fast-sgd": "C7", "fast": "C2", "budget": "C0",
              "airbench94_muon": "C3"}

    def kind(label):
        return label.split()[0]
    for r in rows:
        ax.scatter(r["train_seconds"], r["val_acc"] * 100, s=12, alpha=0.3,
                   color=colour.get(kind(r["label"]), "C0"))
    for name, text in (("budget", "cnnkit fast recipe, --time-budget"),
                       ("airbench94_muon", "airbench94_muon (anchor), 4–16 epochs")):
        points = [(s, acc) for label, acc, s in summary if kind(label) == name]
        ax.plot([s for s, _ in points], [acc * 100 for _, acc in points], "-o",
                color=colour[name], label=f"{text} (mean)")
    for label, acc, s in summary:
        if kind(label) in ("tutorial", "fast-sgd", "fast"):
            ax.scatter([s], [acc * 100], marker="*", s=150, color=colour[kind(label)],
                       label=f"--recipe {label}")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (2-core CPU, float32)")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("CIFAR-10 subset (4,068 train / 1,017 val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "frontier.png", dpi=120)


if __name__ == "__main__":
    main()

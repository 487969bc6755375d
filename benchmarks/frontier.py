"""Accuracy against training time on the real CIFAR-10 subset (../shared/data), 20%
validation split, several seeds: the tutorial recipe, the fast recipe, and the fast recipe
fitted to time budgets. Writes a markdown table and benchmarks/frontier.png.

    python benchmarks/frontier.py [--seeds 0 1 2] [--budgets 10 30 60 120 300]
        [--data PATH] [--out benchmarks/frontier.json]

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

import cnnkit  # noqa: E402

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=float, default=[10, 30, 60, 120, 300])
    p.add_argument("--skip-tutorial", action="store_true")
    p.add_argument("--out", default=str(HERE / "frontier.json"))
    a = p.parse_args()
    jobs = [] if a.skip_tutorial else [("tutorial", dict(recipe="tutorial"))]
    jobs.append(("fast", dict(recipe="fast")))
    jobs += [(f"budget {b:g}s", dict(recipe="fast", time_budget=b)) for b in a.budgets]
    rows = [run(label, seed, a.data, **settings) for label, settings in jobs for seed in a.seeds]
    Path(a.out).write_text(json.dumps(rows, indent=2))

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

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["train_seconds"], r["val_acc"] * 100, s=12, alpha=0.4,
                   color="C1" if r["label"] == "tutorial" else "C0")
    budget = [(s, acc) for label, acc, s in summary if label.startswith("budget")]
    ax.plot([s for s, _ in budget], [acc * 100 for _, acc in budget], "-o", color="C0",
            label="fast recipe, --time-budget (mean)")
    for label, acc, s in summary:
        if not label.startswith("budget"):
            ax.scatter([s], [acc * 100], marker="*", s=150,
                       color="C1" if label == "tutorial" else "C2", label=f"--recipe {label}")
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

"""cnnkit against the record holder on the whole command: accuracy against wall-clock time
on the real CIFAR-10 subset (../shared/data), its dev split (20% of the training images held
out, drawn by the seed), several seeds.

Every point is a whole command, timed from the process' start to its exit: `cnnkit train`
(Python's start, imports, data, its evaluations, TTA, checkpoints, report) and the
published airbench94_muon.py moved to the CPU (benchmarks/real_anchor.py; its whitening,
training, per-epoch evaluation and TTA, in a process of its own). Both are also given
with their training seconds alone (cnnkit: metrics.csv; the anchor: its own timer).

    git clone https://github.com/KellerJordan/cifar10-airbench /tmp/airbench  # not in our tree
    python benchmarks/frontier.py --anchor-script /tmp/airbench/airbench94_muon.py \
        [--seeds 0 1 2] [--anchor-epochs 8 12 16] [--budgets 10 30] [--data PATH] \
        [--out benchmarks/frontier-whole.json]
    python benchmarks/frontier.py --rows A.json B.json [--out AB.json]  # saved rows together

Per seed: the anchor at each of its epoch points; cnnkit's default; cnnkit with
`--time-budget` set to each anchor point's whole-script seconds (this seed's), then any
fixed `--budgets`. The targets (Round 3, issue "4 of 6"): the default ≥ the 16-epoch
anchor + 0.5 points in no more than its whole time, and each budget point ≥ its anchor
point + 0.5. Without `--anchor-script`, benchmarks/airbench94.py's re-implementation runs
in this process instead (training seconds only). Writes a markdown table,
the raw rows (--out) and their plot beside them. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cnnkit  # noqa: E402
import real_anchor  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py"
ANCHOR = dict(batch_size=256, widths=(32, 128, 128))  # the CPU anchor


def cnnkit_command(label: str, seed: int, data: str, flags: list[str]) -> dict:
    """`cnnkit train` as a user runs it, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "cnnkit", "train", "--data", data,
                   "--val-fraction", "0.2", "--seed", str(seed), "--out", f"{tmp}/run",
                   *flags]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        whole = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        with open(f"{tmp}/run/metrics.csv") as f:
            rows = list(csv.DictReader(f))
    row = {"label": label, "seed": seed, "val_acc": float(rows[-1]["val_acc"]),
           "train_seconds": sum(float(r["seconds"]) for r in rows),
           "val_seconds": sum(float(r["val_seconds"]) for r in rows),
           "whole_seconds": whole, "epochs": len(rows), "flags": flags}
    print(json.dumps(row), flush=True)
    return row


def anchor_command(label: str, seed: int, data: str, epochs: float, script: Path) -> dict:
    """The published script, on this seed's dev split."""
    ds = cnnkit.load_dataset(data, val_fraction=0.2, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        real_anchor.write_split(ds.train, ds.val, ds.classes, Path(tmp) / "cifar10")
        r = real_anchor.run(script, Path(tmp), epochs=epochs, seed=seed, **ANCHOR)
    row = {"label": label, "seed": seed, **r, "anchor": True}
    print(json.dumps(row), flush=True)
    return row


def anchor_in_process(label: str, seed: int, data: str, epochs: float) -> dict:
    """benchmarks/airbench94.py's re-implementation (training seconds only)."""
    from airbench94 import train_muon_anchor
    ds = cnnkit.load_dataset(data, val_fraction=0.2, seed=seed)
    r = train_muon_anchor(ds.train, ds.val, epochs=epochs, seed=seed, **ANCHOR)
    row = {"label": label, "seed": seed, "val_acc": r["val_acc"],
           "train_seconds": r["train_seconds"], "whole_seconds": None, "epochs": epochs,
           "anchor": True}
    print(json.dumps(row), flush=True)
    return row


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def paired(rows: list[dict], label: str, anchor_label: str) -> tuple[float, float, list[float]]:
    """`label`'s accuracy minus `anchor_label`'s, seed by seed (points): their mean, its
    standard error and the differences. A seed draws the dev split, so pairing by seed
    takes the split's difficulty out of the comparison; what is left is each run's own
    noise."""
    by_seed = {r["seed"]: r["val_acc"] for r in rows if r["label"] == anchor_label}
    diffs = [100 * (r["val_acc"] - by_seed[r["seed"]]) for r in rows
             if r["label"] == label and r["seed"] in by_seed]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, diffs


def describe(diff: tuple[float, float, list[float]]) -> str:
    m, se, diffs = diff
    return (f"seed by seed {' / '.join(f'{d:+.1f}' for d in diffs)}: {m:+.2f} ± {se:.2f} "
            f"(standard error)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--anchor-epochs", nargs="*", type=float, default=[8, 12, 16])
    p.add_argument("--anchor-script", type=Path,
                   help="the published airbench94_muon.py, outside this tree")
    p.add_argument("--budgets", nargs="*", type=float, default=[],
                   help="fixed --time-budget points besides the anchor's")
    p.add_argument("--flags", default="", help="extra cnnkit train flags for every cnnkit run")
    p.add_argument("--out", default=None,
                   help="the raw rows; the plot goes beside it (.png) (default: "
                        "benchmarks/frontier-whole.json; with --rows, none)")
    p.add_argument("--rows", nargs="+", type=Path,
                   help="run nothing: the table, targets and plot of rows saved by earlier "
                        "runs (other seeds' files together)")
    a = p.parse_args()
    extra = a.flags.split()
    rows = []
    if a.rows:
        if a.out and Path(a.out).resolve() in {path.resolve() for path in a.rows}:
            raise SystemExit(f"--out {a.out} is one of the --rows files; give another name")
        for path in a.rows:
            rows += json.loads(path.read_text())
        a.seeds = []
    elif a.out is None:
        a.out = str(HERE / "frontier-whole.json")
    for seed in a.seeds:  # seed for seed: each seed's points, the anchor's included, together
        anchors = []
        for e in a.anchor_epochs:
            label = f"airbench94_muon {e:g} epochs"
            anchors.append(anchor_command(label, seed, a.data, e, a.anchor_script)
                           if a.anchor_script else anchor_in_process(label, seed, a.data, e))
        rows += anchors
        rows.append(cnnkit_command("cnnkit default", seed, a.data, extra))
        for anchor in anchors:
            budget = anchor["whole_seconds"] or anchor["train_seconds"]
            rows.append(cnnkit_command(
                f"cnnkit --time-budget = anchor {anchor['epochs']:g} epochs' time", seed,
                a.data, [*extra, "--time-budget", f"{budget:.1f}"]))
        rows += [cnnkit_command(f"cnnkit --time-budget {b:g}", seed, a.data,
                                [*extra, "--time-budget", f"{b:g}"]) for b in a.budgets]
        Path(a.out).write_text(json.dumps(rows, indent=2))

    labels = list(dict.fromkeys(r["label"] for r in rows))
    summary = {}
    print("\n| run | val acc (mean) | per seed | whole command s (mean) | training s (mean) "
          "| epochs |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        acc, whole, train = mean(rs, "val_acc"), mean(rs, "whole_seconds"), \
            mean(rs, "train_seconds")
        summary[label] = (acc, whole, train)
        per_seed = " / ".join(f"{r['val_acc'] * 100:.1f}" for r in rs)
        epochs = sorted({r["epochs"] for r in rs})
        print(f"| {label} | {acc * 100:.2f}% | {per_seed} | "
              f"{'–' if whole is None else f'{whole:.1f}'} | {train:.1f} | "
              f"{'–'.join(f'{e:g}' for e in (epochs[0], epochs[-1])) if len(epochs) > 1 else f'{epochs[0]:g}'} |")

    print("\nTargets (means over seeds; then cnnkit minus the anchor, paired by seed):")
    for e in a.anchor_epochs:
        anchor_label = f"airbench94_muon {e:g} epochs"
        budget_label = f"cnnkit --time-budget = anchor {e:g} epochs' time"
        anchor, budget = summary[anchor_label], summary[budget_label]
        print(f"  budget at the anchor's {e:g}-epoch time: {budget[0] * 100:.2f}% against "
              f"{anchor[0] * 100:.2f}% + 0.5 ({(budget[0] - anchor[0]) * 100:+.2f} points) "
              f"{'met' if budget[0] - anchor[0] >= 0.005 else 'NOT met'}; whole "
              f"{budget[1]:.1f} s against {anchor[1] or anchor[2]:.1f} s; "
              f"{describe(paired(rows, budget_label, anchor_label))}")
    top_label = f"airbench94_muon {max(a.anchor_epochs):g} epochs"
    top, default = summary[top_label], summary["cnnkit default"]
    ok = default[0] - top[0] >= 0.005 and default[1] <= (top[1] or top[2])
    print(f"  default: {default[0] * 100:.2f}% in {default[1]:.1f} s against "
          f"{top[0] * 100:.2f}% in {(top[1] or top[2]):.1f} s: {'met' if ok else 'NOT met'}; "
          f"{describe(paired(rows, 'cnnkit default', top_label))}")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        colour = "C3" if rs[0].get("anchor") else "C2" if label == "cnnkit default" else "C0"
        for r in rs:
            ax.scatter(r["whole_seconds"] or r["train_seconds"], r["val_acc"] * 100, s=12,
                       alpha=0.3, color=colour)
    for name, colour, text in (("airbench94_muon", "C3", "airbench94_muon, 8–16 epochs"),
                               ("cnnkit --time-budget", "C0", "cnnkit --time-budget")):
        points = sorted((v[1] or v[2], v[0]) for k, v in summary.items()
                        if k.startswith(name))
        ax.plot([s for s, _ in points], [acc * 100 for _, acc in points], "-o",
                color=colour, label=f"{text} (mean)")
    ax.scatter([default[1]], [default[0] * 100], marker="*", s=150, color="C2",
               label="cnnkit default (mean)")
    ax.set_xlabel("whole command, seconds (2-core CPU, float32)")
    ax.set_ylabel("dev-split accuracy, %")
    ax.set_title("CIFAR-10 subset (4,068 train / 1,017 dev)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if a.out:
        if a.rows:
            Path(a.out).write_text(json.dumps(rows, indent=2))
        fig.savefig(Path(a.out).with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

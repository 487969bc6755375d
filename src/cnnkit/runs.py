"""Look across runs: a table of the runs in a folder, and their curves overlaid."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import CnnkitError
from .plots import plot_compare


def read_metrics(run: Path) -> list[dict]:
    with open(Path(run) / "metrics.csv", newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def list_runs(folder: str | Path = "runs") -> list[dict]:
    """One row per run folder below `folder`: name, model, recipe, epochs, best validation
    accuracy, training seconds, date; newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CnnkitError(f"no folder {folder}; runs are written to runs/ by default")
    rows = []
    for config in sorted(folder.glob("*/config.json")) + sorted(folder.glob("config.json")):
        run = config.parent
        try:
            meta = json.loads(config.read_text())
            metrics = read_metrics(run) if (run / "metrics.csv").exists() else []
        except (OSError, ValueError, KeyError):
            continue  # not a run folder, or one being written
        rows.append({"run": str(run), "model": meta.get("model", "?"),
                     "recipe": meta.get("recipe", "?"), "data": Path(str(meta.get("data"))).name,
                     "epochs": f"{len(metrics)}/{meta.get('epochs', '?')}",
                     "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
                     "train_seconds": sum(m["seconds"] for m in metrics),
                     "date": meta.get("created", "")})
    return sorted(rows, key=lambda r: r["date"], reverse=True)


def format_runs(rows: list[dict]) -> str:
    head = ["run", "model", "recipe", "data", "epochs", "best val acc", "train s", "date"]
    table = [[r["run"], r["model"], r["recipe"], r["data"], r["epochs"],
              "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}",
              f"{r['train_seconds']:.1f}", r["date"][:19]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths))
                     for line in [head] + table)


def compare(runs: list[str | Path], out: str | Path) -> Path:
    curves = {}
    for run in runs:
        if not (Path(run) / "metrics.csv").is_file():
            raise CnnkitError(f"{run} is not a run folder (no metrics.csv)")
        curves[Path(run).name] = read_metrics(Path(run))
    return plot_compare(curves, Path(out))

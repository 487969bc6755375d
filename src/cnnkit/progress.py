"""What a user watching sees: progress bars (tqdm.auto: a bar at a terminal, a widget in a
notebook) and the per-epoch table, in the manner of Keras and Ultralytics.

Bars show only where someone watches: at a terminal or in a notebook, and in one process
of a distributed job. Logs, CI and files get the table rows alone.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether bars are drawn by default: $CNNKIT_PROGRESS=1/0 decides if set; else yes at a
    terminal or in a notebook, in global rank 0 only."""
    forced = os.environ.get("CNNKIT_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("RANK", "0") != "0":
        return False
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it",
        enabled: bool | None = None) -> tqdm:
    """A bar that disappears when done (the results are printed after it)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                disable=not (interactive() if enabled is None else enabled))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class EpochTable:
    """One header, then a row per epoch: losses and accuracies ("-" where the epoch had no
    evaluation), lr, the epoch's seconds (training and evaluation), the time left at the
    mean pace, and `*` on a new best."""
    epochs: int
    val_name: str = "val"
    top5: bool = False
    mean_ap: bool = False  # multi-label: a column of the validation mAP

    def _columns(self) -> list[tuple[str, int]]:
        v = self.val_name
        return [("epoch", 7), ("train loss", 12), ("train acc", 11), (f"{v} loss", 11),
                (f"{v} acc", 10)] + ([("top-5", 8)] if self.top5 else []) + \
            ([(f"{v} mAP", 10)] if self.mean_ap else []) + \
            [("lr", 10), ("time", 8), ("left", 8)]

    def header(self) -> str:
        return "".join(f"{name:>{width}}" for name, width in self._columns())

    def row(self, metrics: list[dict], best: bool, note: str = "") -> str:
        """The row of the last epoch in `metrics` (every epoch so far: the time left is
        their mean pace times the epochs still to come)."""
        m = metrics[-1]
        spent = [r["seconds"] + r.get("val_seconds", 0.0) for r in metrics]
        left = sum(spent) / len(spent) * (self.epochs - m["epoch"] - 1)
        def cell(key: str) -> str:  # "-": an epoch without an evaluation (--eval-every)
            return f"{m[key]:.4f}" if key in m else "-"
        cells = [f"{m['epoch'] + 1}/{self.epochs}", cell("train_loss"), cell("train_acc"),
                 cell("val_loss"), cell("val_acc")]
        if self.top5:
            cells.append(cell("val_top5"))
        if self.mean_ap:
            cells.append(cell("val_map"))
        cells += [f"{m['lr']:.2e}" if "lr" in m else "-", _duration(spent[-1]),
                  _duration(left)]
        line = "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self._columns()))
        return line + (" *" if best else "") + (f"  {note}" if note else "")

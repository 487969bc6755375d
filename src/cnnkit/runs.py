"""Run folders: created without overwriting anything and locked while a run writes them;
their metrics.csv; and a look across runs (a table of the runs in a folder)."""
from __future__ import annotations

import csv
import fcntl
import io
import shutil
import json
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import RunInfo, atomic_write, save_checkpoint
from .errors import CnnkitError, SettingsError

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                  "val_seconds"]
OPTIONAL_COLUMNS = ["val_top5", "val_map", "lr"]  # val_map: multi-label runs


class RunFolder:
    """The run folder, created (or reopened to resume) and locked for the run: a second
    training pointed at the same folder refuses instead of overwriting it. The lock is an
    flock, so it dies with the process, even on SIGKILL."""

    def __init__(self, existing: Path | None, out: str | None, name: str, resume: bool):
        self.existing, self.out, self.name, self.resume = existing, out, name, resume
        self.lock = None

    def __enter__(self) -> Path:
        path = self.existing if self.resume else self._create()
        try:
            self.lock = open(path / ".lock", "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise CnnkitError(f"another cnnkit training is writing to {path}; wait for it "
                              "or use another --out") from None
        except OSError as e:
            raise CnnkitError(f"cannot write to run folder {path}: {e.strerror}") from None
        if not self.resume and any(p.name != ".lock" for p in path.iterdir()):
            raise CnnkitError(f"{path} was filled by another training while this one "
                              "started; nothing was overwritten")
        return path

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.close()

    def _create(self) -> Path:
        if self.out is not None:
            out = Path(self.out)
            check_new_run_dir(out)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CnnkitError(f"cannot create run folder {out}: {e.strerror}") from None
            return out
        root = Path("runs")
        try:
            root.mkdir(exist_ok=True)
        except OSError as e:
            raise CnnkitError(f"cannot create {root.resolve()}: {e.strerror}; pass --out")
        for n in range(1, 10_000):
            path = root / (self.name if n == 1 else f"{self.name}-{n}")
            try:
                path.mkdir()  # atomic: two runs starting together get different folders
                return path
            except FileExistsError:
                continue
        raise CnnkitError(f"too many runs named {self.name} in {root}; pass --out")


def clear_unstarted(path: Path) -> None:
    """Empty a run folder that a job made and then died in before saving an epoch (what a
    restart of the same job may do): only the files a start writes, never a checkpoint."""
    if not path.is_dir() or any(path.glob("*.pt")):
        return
    for name in ("config.json", "metrics.csv"):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "tensorboard", ignore_errors=True)


def check_new_run_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(p.name != ".lock" for p in path.iterdir())):
        raise SettingsError(f"--out {path} already exists and is not empty; cnnkit never "
                            f"overwrites a run: pick another folder, or --resume it")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The whole table, rewritten atomically each epoch: it never holds a torn row."""
    # lr and top-5 came later: a resumed older run leaves their cells empty
    columns = METRIC_COLUMNS + [c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) if c in row else "" for c in columns])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_config(run_dir: Path, info: RunInfo) -> None:
    """config.json: the run's record, as every checkpoint of it holds it too."""
    atomic_write(Path(run_dir) / "config.json",
                 lambda f: f.write(json.dumps(info.to_dict(), indent=2).encode()))


def save_epoch(run_dir: Path, ckpt: dict, improved: bool, train_state: dict) -> None:
    """best.pt if the model improved, last.pt with the training state, metrics.csv; written
    whole, together."""
    with deferred_interrupts():
        if improved:
            save_checkpoint(run_dir / "best.pt", ckpt)
        save_checkpoint(run_dir / "last.pt", {**ckpt, "train_state": train_state})
        write_metrics(run_dir / "metrics.csv", train_state["history"])


def last_saved_epoch(run_dir: Path) -> int | None:
    last = Path(run_dir) / "last.pt"
    return torch.load(last, weights_only=True)["epoch"] if last.exists() else None


@contextmanager
def deferred_interrupts():
    """Ctrl-C or SIGTERM while an epoch's files are being written takes effect once they are
    complete; a second Ctrl-C stops at once (the atomic writes still leave whole files)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []

    def hold(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        handler = previous[pending[0]]
        if callable(handler):
            handler(pending[0], None)  # the handler the caller installed (e.g. the CLI's)
        raise KeyboardInterrupt


class TensorBoard:
    """TensorBoard logs in the run folder (`--tensorboard`): a batch of training images,
    then losses, accuracies and the lr per epoch."""

    def __init__(self, run_dir: Path, images: torch.Tensor):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SettingsError("--tensorboard needs the tensorboard package: "
                                "pip install 'cnnkit[tensorboard]'") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.writer.add_images("train/batch", images.cpu(), 0)

    def log(self, row: dict, lr: float) -> None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_map"):
            if key in row:
                self.writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
        self.writer.add_scalar("lr", lr, row["epoch"])
        self.writer.flush()

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


def evaluated(metrics: list[dict], key: str = "val_acc") -> list[dict]:
    """The rows of the epochs that were evaluated (`--eval-every` skips some)."""
    return [m for m in metrics if key in m]


def read_metrics(run: Path) -> list[dict]:
    with open(Path(run) / "metrics.csv", newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
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
                     "best_val_acc": max((m["val_acc"] for m in evaluated(metrics)),
                                         default=None),
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

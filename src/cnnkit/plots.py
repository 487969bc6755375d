"""Pictures, drawn with matplotlib's file backend (no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import CnnkitError
from .metrics import over_thresholds
from .runs import evaluated, read_metrics


def pyplot():
    """matplotlib's pyplot with the file backend (no display needed), imported on the first
    picture so that `import cnnkit` stays light."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def image_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str], out: Path,
               title: str | None = None) -> Path:
    """A square-ish grid of uint8 (N, C, H, W) images titled with their class names."""
    titles = ["|".join(classes[k] for k in labels[i].nonzero().flatten().tolist())
              if labels.ndim == 2 else classes[int(labels[i])] for i in range(len(images))]
    return plot_images(images, titles, out, title or "", cols=math.ceil(math.sqrt(len(images))),
                       cell=(1.3, 1.45))


def _save(fig, out: Path) -> Path:
    plt = pyplot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_curves(metrics: list[dict], out: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and validation."""
    plt = pyplot()
    epochs = [m["epoch"] for m in metrics]
    scored = evaluated(metrics)
    at = [m["epoch"] for m in scored]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "-o", ms=3, label="train")
    ax_loss.plot(at, [m["val_loss"] for m in scored], "-o", ms=3, label="validation")
    ax_acc.plot(epochs, [m["train_acc"] * 100 for m in metrics], "-o", ms=3, label="train")
    ax_acc.plot(at, [m["val_acc"] * 100 for m in scored], "-o", ms=3, label="validation")
    if scored and all("val_map" in m for m in scored):  # multi-label
        ax_acc.plot(at, [m["val_map"] * 100 for m in scored], "-o", ms=3,
                    label="validation mAP")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy, %")):
        _integer_epochs(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_confusion(confusion: torch.Tensor, classes: list[str], out: Path) -> Path:
    """The confusion matrix normalized per true class (rows sum to 1), counts in the title."""
    plt = pyplot()
    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    k = len(classes)
    size = max(5, min(0.55 * k + 2, 30))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = float(norm[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 else "black")
    ax.set_title(f"confusion matrix (normalized; {int(cm.sum())} images)")
    fig.colorbar(im, fraction=0.046)
    fig.tight_layout()
    return _save(fig, out)


def plot_per_class(per_class: dict[str, float | None], out: Path, what: str = "accuracy"
                   ) -> Path:
    plt = pyplot()
    names = list(per_class)
    values = [100 * (v or 0.0) for v in per_class.values()]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(names) + 1)))
    ax.barh(range(len(names)), values, color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{what}, %")
    for i, v in enumerate(values):
        ax.text(min(v + 1, 92), i, f"{v:.1f}", va="center", fontsize=7)
    ax.set_title(f"{what} per class")
    fig.tight_layout()
    return _save(fig, out)


def top_losses(probs: torch.Tensor, labels: torch.Tensor, k: int,
               thresholds: list[float] | None = None) -> list[dict]:
    """The k items with the highest cross-entropy loss, highest first. Multi-label (labels
    (N, K)): the binary cross-entropy summed over the labels, each item with its true and
    its called labels (at `thresholds`)."""
    if labels.ndim == 2:
        p = probs.double().clamp(1e-12, 1 - 1e-12)
        losses = -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(1)
        called = over_thresholds(probs, thresholds or [0.5] * labels.shape[1])
        order = losses.argsort(descending=True, stable=True)[:k]
        return [{"index": int(i), "labels": labels[i].nonzero().flatten().tolist(),
                 "called": called[i].nonzero().flatten().tolist(), "loss": float(losses[i])}
                for i in order]
    losses = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log()
    order = losses.argsort(descending=True, stable=True)[:k]
    return [{"index": int(i), "label": int(labels[i]), "pred": int(probs[i].argmax()),
             "prob": float(probs[i].max()), "loss": float(losses[i])} for i in order]


def plot_top_losses(images: torch.Tensor, items: list[dict], classes: list[str],
                    out: Path) -> Path:
    """The most confidently wrong validation images: true class, prediction, probability."""
    def names(ks, most=3):  # a long label set would run into its neighbours' titles
        shown = "|".join(classes[k] for k in ks[:most]) or "-"
        return shown + (f" +{len(ks) - most}" if len(ks) > most else "")
    titles = [f"true {names(item['labels'])}\ncalled {names(item['called'])}\n"
              f"loss {item['loss']:.2f}" if "called" in item else  # multi-label
              f"true {classes[item['label']]}\npred {classes[item['pred']]} "
              f"{item['prob']:.2f}, loss {item['loss']:.2f}" for item in items]
    return plot_images(images[[item["index"] for item in items]], titles, out,
                       "top losses (validation)", cols=4, cell=(2.6, 2.8), fontsize=8)


def plot_lr_find(lrs: list[float], losses: list[float], suggested: float, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="C1", ls="--", label=f"suggested lr {suggested:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    return _save(fig, out)


def plot_compare(runs: dict[str, list[dict]], out: Path) -> Path:
    """Validation accuracy and training loss of several runs, overlaid."""
    plt = pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, metrics in runs.items():
        epochs = [m["epoch"] for m in metrics]
        scored = evaluated(metrics)
        ax_acc.plot([m["epoch"] for m in scored], [m["val_acc"] * 100 for m in scored], "-o",
                    ms=3, label=name)
        ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "-o", ms=3, label=name)
    for ax, name in ((ax_acc, "validation accuracy, %"), (ax_loss, "training loss")):
        _integer_epochs(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def compare_runs(runs: list[str | Path], out: str | Path) -> Path:
    """The curves of several run folders overlaid in one picture."""
    curves = {}
    for run in runs:
        if not (Path(run) / "metrics.csv").is_file():
            raise CnnkitError(f"{run} is not a run folder (no metrics.csv)")
        curves[Path(run).name] = read_metrics(Path(run))
    return plot_compare(curves, Path(out))


def _show(ax, image: torch.Tensor, title: str, fontsize: float = 7) -> None:
    img = image.permute(1, 2, 0).cpu().numpy()
    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray", interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)


def plot_images(images: torch.Tensor, titles: list[str], out: Path, title: str = "",
                cols: int = 6, cell: tuple[float, float] = (1.9, 2.2),
                fontsize: float = 7) -> Path:
    """uint8 (N, C, H, W) images in rows of `cols`, each with its (multi-line) title, in
    cells of `cell` inches."""
    plt = pyplot()
    cols = min(cols, max(len(images), 1))
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell[0], rows * cell[1]),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t in zip(axes.flat, images, titles):
        _show(ax, image, t, fontsize)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_image_pairs(first: torch.Tensor, second: torch.Tensor, first_titles: list[str],
                     second_titles: list[str], out: Path, per_row: int = 3) -> Path:
    """Pairs of images side by side (duplicates), `per_row` pairs to a row."""
    plt = pyplot()
    n = len(first)
    cols, rows = 2 * min(per_row, max(n, 1)), max(1, math.ceil(n / per_row))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        row, col = divmod(k, per_row)
        _show(axes[row, 2 * col], first[k], first_titles[k])
        _show(axes[row, 2 * col + 1], second[k], second_titles[k])
    fig.suptitle("duplicate pairs, most similar first (features/pixels)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_class_balance(classes: list[dict], splits: list[str], out: Path) -> Path:
    """Images per class, stacked by split, with each class's label issues marked."""
    plt = pyplot()
    names = [c["class"] for c in classes]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(names) + 1)))
    left = [0] * len(names)
    for k, split in enumerate(splits):
        counts = [c[split] for c in classes]
        ax.barh(range(len(names)), counts, left=left, color=f"C{k}", label=split)
        left = [a + b for a, b in zip(left, counts)]
    for i, c in enumerate(classes):
        ax.text(left[i], i, f" {c['label_issues']} flagged", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.25)
    ax.set_xlabel("images")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("images per class (label issues flagged by doctor)")
    fig.tight_layout()
    return _save(fig, out)

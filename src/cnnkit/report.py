"""The pictures of a run or an evaluation, and report.html: one self-contained page
(images embedded as data URIs) that opens from the file system in any browser; and the
tutorial's grid of training images (`show_batch`)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .data import load_dataset
from .explain import filters, worst_cams
from .plots import (image_grid, plot_confusion, plot_curves, plot_per_class, plot_top_losses,
                    top_losses)
from .progress import bar


def most_confused(confusion: torch.Tensor, classes: list[str], k: int = 5) -> list[dict]:
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten().argsort(descending=True, stable=True)[:k]
    n = len(classes)
    return [{"true": classes[i // n], "pred": classes[i % n], "count": int(off.flatten()[i])}
            for i in flat.tolist() if off.flatten()[i] > 0]


def write_report(out: Path, *, evaluation: dict, images: torch.Tensor, labels: torch.Tensor,
         probs: torch.Tensor, metrics: list[dict] | None = None, settings: dict | None = None,
         top_k: int = 16, model=None) -> Path:
    """Write curves.png (with metrics), confusion.png, per-class.png, top-losses.png,
    evaluation.json and report.html into `out`; with `model` (a LoadedModel) also
    filters.png and gradcam-worst.png. Return the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = evaluation["classes"]
    confusion = torch.tensor(evaluation["confusion_matrix"])
    top = top_losses(probs, labels.cpu(), min(top_k, len(labels)))
    drawings = []  # (title, file, how), drawn in this order under one progress bar
    if metrics:
        drawings.append(("Training curves", "curves.png", lambda p: plot_curves(metrics, p)))
    drawings += [
        ("Confusion matrix", "confusion.png", lambda p: plot_confusion(confusion, classes, p)),
        ("Accuracy per class", "per-class.png",
         lambda p: plot_per_class(evaluation["per_class_accuracy"], p)),
        ("Top losses", "top-losses.png",
         lambda p: plot_top_losses(images.cpu(), top, classes, p))]
    if model is not None:  # inside the network: first-layer filters, Grad-CAM of the worst
        drawings += [
            ("First-layer filters", "filters.png", lambda p: Path(filters(model, p)["file"])),
            ("Grad-CAM of the worst-classified images", "gradcam-worst.png",
             lambda p: worst_cams(model, images.cpu(), top[:8], p))]
    pictures = {title: draw(out / name) for title, name, draw in
                bar(drawings, desc="drawing the report", unit="picture")}
    confused = most_confused(confusion, classes)
    record = {**evaluation, "top_losses": top, "most_confused": confused}
    atomic_write(out / "evaluation.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    page = _html(evaluation, metrics or [], settings or {}, confused, pictures)
    atomic_write(out / "report.html", lambda f: f.write(page.encode()))
    return out / "report.html"


def show_batch(data: str, out: str | Path, *, n: int = 64, seed: int = 0,
               data_dir: str | None = None, image_size: int | None = None,
               augment=None) -> Path:
    """Save a grid of `n` random training images of a data source, like the tutorial's plot;
    with `augment` (a transforms.Augment), as the model sees them after augmentation."""
    ds = load_dataset(data, data_dir=data_dir, image_size=image_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(ds.train), generator=g)[:n]
    images = ds.train.images[index]
    title = f"{ds.name}: {len(index)} training images"
    if augment is not None and augment.active:
        x = augment(images.float() / 255, index, 1, g, seed)
        images = (x * 255).round().clamp(0, 255).to(torch.uint8)
        title += f" (augmented: flip {augment.flip}, " + (
            f"crops ≥ {augment.crop_scale:g}, ±{augment.rotate:g}°, jitter {augment.jitter:g})"
            if augment.warps else f"translate {augment.translate}, cutout {augment.cutout})")
    return image_grid(images, ds.train.labels[index], ds.classes, Path(out), title=title)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def _table(rows, head=None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                    for r in rows)
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" \
        if head else ""
    return f"<table>{header}{cells}</table>"


def _html(evaluation, metrics, settings, confused, pictures) -> str:
    title = settings.get("run_dir") or evaluation.get("data", "evaluation")
    last = metrics[-1] if metrics else {}
    summary = [("accuracy", f"{evaluation['accuracy']:.4f}")]
    if "top5_accuracy" in evaluation:
        summary.append(("top-5 accuracy", f"{evaluation['top5_accuracy']:.4f}"))
    summary += [("loss", f"{evaluation['loss']:.4f}"),
               ("images", evaluation["num_images"]),
               ("split", evaluation["split"]), ("data", evaluation["data"])]
    if metrics:
        summary += [("epochs", len(metrics)),
                    ("training seconds", f"{sum(m['seconds'] for m in metrics):.1f}"),
                    ("final train accuracy", f"{last['train_acc']:.4f}")]
    keep = [(k, v) for k, v in settings.items() if not isinstance(v, (list, dict))]
    sections = [f"<h2>{html.escape(name)}</h2>{_img(path)}" for name, path in pictures.items()]
    scores = _table([(c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
                      m["support"]) for c, m in evaluation.get("per_class", {}).items()] +
                    [(f"{a} average", *(f"{evaluation[a + '_avg'][k]:.4f}" for k in
                                        ("precision", "recall", "f1")), evaluation["num_images"])
                     for a in ("macro", "weighted") if a + "_avg" in evaluation],
                    ["class", "precision", "recall", "f1", "images"])
    pairs = _table([(c["true"], c["pred"], c["count"]) for c in confused],
                   ["true class", "predicted as", "images"]) if confused else "<p>none</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cnnkit report: {html.escape(str(title))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
th {{ background: #f0f0f0; }}
</style></head><body>
<h1>cnnkit report</h1>
<p>{html.escape(str(title))}</p>
<h2>Results</h2>{_table(summary)}
<h2>Precision, recall and F1 per class</h2>{scores}
<h2>Most confused classes</h2>{pairs}
{''.join(sections)}
<h2>Settings</h2>{_table(keep, ["setting", "value"]) if keep else "<p>-</p>"}
</body></html>
"""

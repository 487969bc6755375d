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
from .config import Config
from .data import load_dataset
from .explain import filters, worst_cams
from .plots import (image_grid, plot_confusion, plot_curves, plot_per_class, plot_top_losses,
                    top_losses)
from .progress import bar
from .recipes import fill_recipe_defaults
from .transforms import Augment


def most_confused(confusion: torch.Tensor, classes: list[str], k: int = 5) -> list[dict]:
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten().argsort(descending=True, stable=True)[:k]
    n = len(classes)
    return [{"true": classes[i // n], "pred": classes[i % n], "count": int(off.flatten()[i])}
            for i in flat.tolist() if off.flatten()[i] > 0]


def write_report(out: Path, *, evaluation: dict, images: torch.Tensor, labels: torch.Tensor,
         probs: torch.Tensor, metrics: list[dict] | None = None, settings: dict | None = None,
         top_k: int = 16, model=None, pictures: bool = True) -> Path:
    """Write curves.png (with metrics), confusion.png, per-class.png, top-losses.png,
    evaluation.json and report.html into `out`; with `model` (a LoadedModel) also
    filters.png and gradcam-worst.png. Return the report's path. A multi-label evaluation
    gets per-label-ap.png in place of the confusion matrix and per-class accuracy (labels
    are called one by one, none in place of another), and top losses by binary
    cross-entropy. Without `pictures`, the page and evaluation.json alone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = evaluation["classes"]
    multi = evaluation.get("multi_label", False)
    thresholds = [evaluation["per_label"][c]["threshold"] for c in classes] if multi else None
    top = top_losses(probs, labels.cpu(), min(top_k, len(labels)), thresholds)
    drawings = []  # (title, file, how), drawn in this order under one progress bar
    if metrics:
        drawings.append(("Training curves", "curves.png", lambda p: plot_curves(metrics, p)))
    if multi:
        confused = []
        drawings.append((
            "Average precision per label", "per-label-ap.png",
            lambda p: plot_per_class({c: m["average_precision"] for c, m in
                                      evaluation["per_label"].items()}, p,
                                     what="average precision")))
    else:
        confusion = torch.tensor(evaluation["confusion_matrix"])
        confused = most_confused(confusion, classes)
        drawings += [
            ("Confusion matrix", "confusion.png",
             lambda p: plot_confusion(confusion, classes, p)),
            ("Accuracy per class", "per-class.png",
             lambda p: plot_per_class(evaluation["per_class_accuracy"], p))]
    drawings.append(("Top losses", "top-losses.png",
                     lambda p: plot_top_losses(images.cpu(), top, classes, p)))
    if model is not None:  # inside the network: first-layer filters, Grad-CAM of the worst
        drawings.append(("First-layer filters", "filters.png",
                         lambda p: Path(filters(model, p)["file"])))
        if not multi:
            drawings.append(("Grad-CAM of the worst-classified images", "gradcam-worst.png",
                             lambda p: worst_cams(model, images.cpu(), top[:8], p)))
    pictures = {title: draw(out / name) for title, name, draw in
                bar(drawings if pictures else [], desc="drawing the report", unit="picture")}
    record = {**evaluation, "top_losses": top, **({} if multi else {"most_confused": confused})}
    atomic_write(out / "evaluation.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    page = _html(evaluation, metrics or [], settings or {}, confused, pictures)
    atomic_write(out / "report.html", lambda f: f.write(page.encode()))
    return out / "report.html"


def _label_table(evaluation: dict) -> str:
    """The per-label table of a multi-label evaluation, with its macro averages."""
    def cell(v):
        return "-" if v is None else f"{v:.4f}"
    rows = [(c, cell(m["average_precision"]), cell(m["f1"]), cell(m["precision"]),
             cell(m["recall"]), cell(m["threshold"]), m["support"])
            for c, m in evaluation["per_label"].items()]
    avg = evaluation["macro_avg"]
    rows.append(("macro average", cell(evaluation["mean_average_precision"]), cell(avg["f1"]),
                 cell(avg["precision"]), cell(avg["recall"]), "", ""))
    return html_table(rows, ["label", "AP", "f1", "precision", "recall", "threshold", "images"])


def show_batch(data: str, out: str | Path, *, n: int = 64, seed: int = 0,
               data_dir: str | None = None, image_size: int | None = None,
               augment=None, config: Config | None = None) -> Path:
    """Save a grid of `n` random training images of a data source, like the tutorial's plot;
    with `augment` (a transforms.Augment), or a `config` whose recipe's augmentation is
    settled for this data set's image size and channels as training settles it, as the
    model sees them after augmentation."""
    ds = load_dataset(data, data_dir=data_dir, image_size=image_size, seed=seed)
    if config is not None:
        augment = Augment.from_config(fill_recipe_defaults(
            config, len(ds.train), "cpu", ds.image_size, channels=ds.in_channels))
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(ds.train), generator=g)[:n]
    images = ds.train.images[index]
    title = f"{ds.name}: {len(index)} training images"
    if augment is not None and augment.active:
        x = augment(images.float() / 255, index, 1, g, seed)
        images = (x * 255).round().clamp(0, 255).to(torch.uint8)
        title += f" (augmented: flip {augment.flip}, " + (
            f"crops ≥ {augment.crop_scale:g}, ±{augment.rotate:g}°, jitter {augment.jitter:g})"
            if augment.warps else f"translate {augment.translate}, cutout {augment.cutout}, "
            f"jitter {augment.jitter:g})")
    return image_grid(images, ds.train.labels[index], ds.classes, Path(out), title=title)


def img_tag(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def html_table(rows, head=None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                    for r in rows)
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" \
        if head else ""
    return f"<table>{header}{cells}</table>"


def _html(evaluation, metrics, settings, confused, pictures) -> str:
    title = settings.get("run_dir") or evaluation.get("data", "evaluation")
    last = metrics[-1] if metrics else {}
    multi = evaluation.get("multi_label", False)
    summary = [("mAP", f"{evaluation['mean_average_precision']:.4f}"),
               ("accuracy of each (image, label) call", f"{evaluation['accuracy']:.4f}"),
               ("exact match (whole label sets)", f"{evaluation['exact_match']:.4f}")] \
        if multi else [("accuracy", f"{evaluation['accuracy']:.4f}")]
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
    sections = [f"<h2>{html.escape(name)}</h2>{img_tag(path)}" for name, path in pictures.items()]
    scores = html_table([(c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
                      m["support"]) for c, m in evaluation.get("per_class", {}).items()] +
                    [(f"{a} average", *(f"{evaluation[a + '_avg'][k]:.4f}" for k in
                                        ("precision", "recall", "f1")), evaluation["num_images"])
                     for a in ("macro", "weighted") if a + "_avg" in evaluation],
                    ["class", "precision", "recall", "f1", "images"])
    pairs = html_table([(c["true"], c["pred"], c["count"]) for c in confused],
                   ["true class", "predicted as", "images"]) if confused else "<p>none</p>"
    scores = f"<h2>Precision, recall and F1 per class</h2>{scores}" \
        f"<h2>Most confused classes</h2>{pairs}" if not multi else \
        f"<h2>Per label: average precision, and F1, precision and recall at its " \
        f"threshold</h2>{_label_table(evaluation)}"
    body = f"""<h2>Results</h2>{html_table(summary)}
{scores}
{''.join(sections)}
<h2>Settings</h2>{html_table(keep, ["setting", "value"]) if keep else "<p>-</p>"}"""
    return html_page("cnnkit report", str(title), body)


def html_page(heading: str, subject: str, body: str) -> str:
    """A self-contained page in the look of every cnnkit report: `heading` about
    `subject` (a run folder, a data set)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(heading)}: {html.escape(subject)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
th {{ background: #f0f0f0; }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(subject)}</p>
{body}
</body></html>
"""

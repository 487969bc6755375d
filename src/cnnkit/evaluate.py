"""`evaluate`: accuracy, per-class accuracy and the confusion matrix of a trained model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import LoadedModel, load
from .data import Split, load_dataset
from .device import select_runtime
from .engine import evaluate as run_eval
from .errors import CnnkitError
from .metrics import evaluation_record
from .report import draw


def evaluate(run, data: str | None = None, *, device: str = "auto", batch_size: int = 500,
             data_dir: str | None = None, tta: int | None = None,
             out: str | Path | None = None) -> dict:
    """Evaluate a run folder or checkpoint.

    Without `data`, on the run's own validation (or test) split, rebuilt from its config.
    With `data`, on that source's test split, or on all of its images if it has none.
    `tta` defaults to the level the run was evaluated with during training. With `out`,
    the pictures and report.html of an evaluation are written there.
    """
    runtime = select_runtime(device)
    lm = run if isinstance(run, LoadedModel) else load(run, runtime.device)
    lm.model.to(runtime.device, memory_format=runtime.memory_format)
    if data is None:
        cfg = lm.config
        ds = load_dataset(cfg.get("data_source") or cfg["data"], data_dir=cfg.get("data_dir"),
                          image_size=lm.image_size[0], val_fraction=cfg.get("val_fraction"),
                          seed=cfg.get("seed", 0), strict=cfg.get("strict", False))
        split, split_name = ds.val, ds.val_name
    else:
        ds = load_dataset(data, data_dir=data_dir, image_size=lm.image_size[0])
        if ds.val_name == "test":
            split, split_name = ds.val, "test"
        else:
            split = Split(torch.cat([ds.train.images, ds.val.images]),
                          torch.cat([ds.train.labels, ds.val.labels]))
            split_name = "all"
    _check_compatible(lm, ds.classes, ds.in_channels)
    split = Split(split.images.to(runtime.device), split.labels.to(runtime.device))
    ev = run_eval(lm.model, split, mean=lm.mean, std=lm.std, runtime=runtime,
                  num_classes=len(lm.classes), batch_size=batch_size,
                  tta=lm.config.get("tta", 0) if tta is None else tta,
                  mirror=lm.config.get("flip", "none") != "none")
    record = evaluation_record(ev.confusion, ev.loss, lm.classes, ds.source, split_name)
    if out is not None:
        draw(Path(out), evaluation=record, images=split.images, labels=split.labels,
             probs=ev.probs, settings={"model": lm.name, "checkpoint": lm.path},
             model=load(lm.path) if lm.path else None)
    return record


def _check_compatible(lm: LoadedModel, classes: list[str], in_channels: int) -> None:
    if in_channels != lm.in_channels:
        raise CnnkitError(f"the model takes {lm.in_channels}-channel images, the data has "
                          f"{in_channels} channels")
    if len(classes) != len(lm.classes):
        raise CnnkitError(f"the model knows {len(lm.classes)} classes "
                          f"({', '.join(lm.classes[:10])}{'…' if len(lm.classes) > 10 else ''}), "
                          f"the data has {len(classes)} "
                          f"({', '.join(classes[:10])}{'…' if len(classes) > 10 else ''})")
    if list(classes) != list(lm.classes) and not all(c.isdigit() for c in classes):
        raise CnnkitError(f"class names differ: model {lm.classes}, data {classes}")


def format_report(result: dict) -> str:
    """The evaluation as text: overall accuracy, per-class accuracy, confusion matrix."""
    classes = result["classes"]
    width = max(8, max(len(c) for c in classes))
    lines = [f"{result['split']} accuracy {result['accuracy']:.4f} on {result['num_images']} "
             f"images ({result['data']}); loss {result['loss']:.4f}", "", "per-class accuracy:"]
    for c, acc in result["per_class_accuracy"].items():
        lines.append(f"  {c:<{width}} {'-' if acc is None else f'{acc:.4f}'}")
    cm = result["confusion_matrix"]
    cell = max(5, max(len(str(v)) for row in cm for v in row) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * (width + 2) + "".join(f"{i:>{cell}}" for i in range(len(classes)))]
    for i, (c, row) in enumerate(zip(classes, cm)):
        lines.append(f"  {c:<{width}}" + "".join(f"{v:>{cell}}" for v in row) + f"   {i}")
    return "\n".join(lines)

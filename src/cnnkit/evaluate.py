"""`evaluate`: accuracy, per-class accuracy and the confusion matrix of a trained model."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import LoadedModel, load
from .data import Dataset, Split, load_dataset, same_source
from .device import select_runtime
from .engine import evaluate_split
from .errors import CnnkitError, unknown_choice
from .metrics import evaluation_record
from .report import write_report


SPLITS = ("train", "val", "test", "all")


def evaluate(run, data: str | None = None, *, split: str | None = None, device: str = "auto",
             batch_size: int = 500, data_dir: str | None = None, tta: int | None = None,
             out: str | Path | None = None, log=None) -> dict:
    """Evaluate a run folder or checkpoint on one split of its data, or of `data`.

    `split` is train, val, test or all; by default the test split when the data has one,
    else validation (for the run's own data, the very images it was validated on). Data
    the run never saw, with no split of its own, is evaluated whole ("all"), and `log`
    is told so. `tta` defaults to the level the run was evaluated with during training.
    With `out`, the pictures and report.html of the evaluation are written there.
    """
    if split is not None and split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    runtime = select_runtime(device)
    lm = run if isinstance(run, LoadedModel) else load(run, runtime.device)
    lm.model.to(runtime.device, memory_format=runtime.memory_format)
    own = data is None or bool(lm.info.data_source and same_source(data, lm.info.data_source))
    if own:  # the run's data, with its own validation split
        ds = lm.info.load_data(data)
    else:
        if lm.multi_label and not str(data).lower().endswith(".csv"):
            raise CnnkitError(f"the model is multi-label: evaluate it on a CSV of path,label "
                              f"rows with labels separated by '|'; {data} is not a CSV")
        ds = load_dataset(data, data_dir=data_dir, image_size=lm.image_size[0],
                          channels=lm.in_channels, multi_label=lm.multi_label)
    if ds.multi_label != lm.multi_label:
        raise CnnkitError(f"the model is {'multi' if lm.multi_label else 'single'}-label, "
                          f"the data {'multi' if ds.multi_label else 'single'}-label "
                          f"('|' in its label cells)")
    _check_compatible(lm, ds.classes)  # channels were converted to the model's
    name = split or ds.default_eval_split
    if split is None and not own and ds.held_out and ds.test is None:
        name = "all"  # data this run never saw, with no split of its own
        if log is not None:
            log(f"{data} has no test or val split of its own: evaluating all of its images")
    images = _split_of(ds, name)
    images = Split(images.images.to(runtime.device), images.labels.to(runtime.device))
    ev = evaluate_split(lm.model, images, mean=lm.mean, std=lm.std, runtime=runtime,
                        num_classes=len(lm.classes), batch_size=batch_size,
                        tta=lm.config.tta if tta is None else tta,
                        mirror=lm.config.flip != "none", thresholds=lm.thresholds)
    record = evaluation_record(ev.confusion, ev.loss, lm.classes, ds.source, name, ev.probs,
                               images.labels, ev.thresholds)
    if out is not None:
        write_report(Path(out), evaluation=record, images=images.images, labels=images.labels,
                     probs=ev.probs, settings={"model": lm.name, "checkpoint": lm.path},
                     model=load(lm.path) if lm.path else None)
    return record


def _split_of(ds: Dataset, name: str) -> Split:
    """One split held in memory; "all" is every image once; "val" and "test" are the same
    images when the test split doubles as validation."""
    splits = dict(ds.splits)
    if ds.val_name == "test":
        splits["val"] = ds.val
    if name == "all":
        parts = list(ds.splits.values())
    elif name in splits:
        parts = [splits[name]]
    else:
        raise CnnkitError(f"{ds.source} has no {name} split; choose --split "
                          f"{' or '.join(sorted(set(splits) | {'all'}))}")
    parts = [p if isinstance(p, Split) else Split(p.head(len(p)), p.labels) for p in parts]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _check_compatible(lm: LoadedModel, classes: list[str]) -> None:
    if len(classes) != len(lm.classes):
        raise CnnkitError(f"the model knows {len(lm.classes)} classes "
                          f"({', '.join(lm.classes[:10])}{'…' if len(lm.classes) > 10 else ''}), "
                          f"the data has {len(classes)} "
                          f"({', '.join(classes[:10])}{'…' if len(classes) > 10 else ''})")
    if list(classes) != list(lm.classes) and not all(c.isdigit() for c in classes):
        raise CnnkitError(f"class names differ: model {lm.classes}, data {classes}")


def format_report(result: dict) -> str:
    """The evaluation as text: accuracy (and top-5), per-class precision, recall (the class's
    accuracy) and F1 with their averages, the confusion matrix."""
    if result.get("multi_label"):
        return _format_multilabel(result)
    classes = result["classes"]
    width = max(16, max(len(c) for c in classes))
    lines = [f"{result['split']} accuracy {result['accuracy']:.4f} on {result['num_images']} "
             f"images ({result['data']}); loss {result['loss']:.4f}"]
    if "top5_accuracy" in result:
        lines.append(f"top-5 accuracy {result['top5_accuracy']:.4f}")
    lines += ["", f"  {'':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'images':>9}"]
    for c, m in result["per_class"].items():
        lines.append(f"  {c:<{width}} {m['precision']:>9.4f} {m['recall']:>9.4f} "
                     f"{m['f1']:>9.4f} {m['support']:>9}")
    for average in ("macro", "weighted"):
        m = result[f"{average}_avg"]
        lines.append(f"  {average + ' average':<{width}} {m['precision']:>9.4f} "
                     f"{m['recall']:>9.4f} {m['f1']:>9.4f} {result['num_images']:>9}")
    cm = result["confusion_matrix"]
    cell = max(5, max(len(str(v)) for row in cm for v in row) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * (width + 2) + "".join(f"{i:>{cell}}" for i in range(len(classes)))]
    for i, (c, row) in enumerate(zip(classes, cm)):
        lines.append(f"  {c:<{width}}" + "".join(f"{v:>{cell}}" for v in row) + f"   {i}")
    return "\n".join(lines)


def _format_multilabel(result: dict) -> str:
    """A multi-label evaluation as text: mAP, the accuracy of the (image, label) calls and
    of whole label sets, and per label its AP, and F1, precision and recall at its
    threshold."""
    width = max(16, max(len(c) for c in result["classes"]))

    def cell(v):
        return f"{'-':>9}" if v is None else f"{v:>9.4f}"
    lines = [f"{result['split']} mAP {result['mean_average_precision']:.4f} on "
             f"{result['num_images']} images ({result['data']}); loss {result['loss']:.4f}",
             f"accuracy {result['accuracy']:.4f} of the (image, label) calls at the "
             f"thresholds; exact match {result['exact_match']:.4f}", "",
             f"  {'':<{width}} {'AP':>9} {'f1':>9} {'precision':>9} {'recall':>9} "
             f"{'threshold':>9} {'images':>9}"]
    for c, m in result["per_label"].items():
        lines.append(f"  {c:<{width}} {cell(m['average_precision'])} {cell(m['f1'])} "
                     f"{cell(m['precision'])} {cell(m['recall'])} {cell(m['threshold'])} "
                     f"{m['support']:>9}")
    m = result["macro_avg"]
    lines.append(f"  {'macro average':<{width}} {cell(result['mean_average_precision'])} "
                 f"{cell(m['f1'])} {cell(m['precision'])} {cell(m['recall'])}")
    return "\n".join(lines)

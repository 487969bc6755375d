"""`predict`: top classes with softmax probabilities (a multi-label model: the labels over
their thresholds, and sigmoid probabilities) for images of any size or mode, from
files, folders (`recursive`) or glob patterns, decoded by a thread pool and inferred in
batches; optionally written to a CSV as they are done."""
from __future__ import annotations

import csv
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import LoadedModel, load
from .data import IMAGE_EXTENSIONS, image_files, image_to_tensor, read_image
from .device import Runtime, select_runtime
from .errors import SettingsError, first_line
from .metrics import over_thresholds
from .progress import bar
from .transforms import to_input


def predict(run, images, *, top_k: int = 3, device: str = "auto", batch_size: int = 64,
            recursive: bool = False, csv_path: str | Path | None = None,
            as_frame: bool = False, weights: str | Path | None = None):
    """For each image: {"file", "predictions": [{"class", "probability"}, ...]} best first,
    plus "label" when its folder is named like one of the model's classes; or {"file",
    "error"} when it cannot be read. A multi-label model's results also hold "labels" (every
    label over its threshold, possibly none) and "probabilities" (label: sigmoid
    probability, for every label). `images` holds paths, folders (their images; with
    `recursive`, their subfolders' too), glob patterns or PIL images. With `csv_path`, each
    result is also written there as a row as soon as it is known. `as_frame=True` returns
    a pandas DataFrame with the CSV's columns instead of the list. `run` may also name a
    torchvision or timm model (`tv:resnet18`, `timm:tf_efficientnet_lite0`): its pretrained
    weights (`weights`: a local copy of them) predict their own classes, ImageNet's."""
    if as_frame:
        try:
            import pandas
        except ImportError:
            raise SettingsError("predict(..., as_frame=True) needs pandas: pip install "
                                "pandas") from None
    runtime = select_runtime(device)
    lm = run if isinstance(run, LoadedModel) else load(run, runtime.device, weights)
    lm.model.to(runtime.device, memory_format=runtime.memory_format)
    items = expand_inputs(images, recursive)
    results = bar(iter_predictions(lm, items, top_k=top_k, runtime=runtime,
                                   batch_size=batch_size),
                  total=len(items), desc="predicting", unit="img")
    results = list(results if csv_path is None else
                   write_csv(results, Path(csv_path), top_k, lm.multi_label))
    if as_frame:
        return pandas.DataFrame([table_row(r, top_k, lm.multi_label) for r in results],
                                columns=table_columns(top_k, lm.multi_label))
    return results


def expand_inputs(items: Iterable, recursive: bool = False) -> list:
    """Paths and PIL images as given; a folder becomes its image files (sorted), a glob
    pattern its matches. A folder or pattern with no image becomes one error entry."""
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = image_files(path, recursive)
            hint = "" if recursive else " (--recursive also reads its subfolders)"
            out += found or [{"file": str(path), "error": f"a folder with no images{hint}"}]
        elif not path.exists() and any(c in str(item) for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
            out += found or [{"file": str(item), "error": "no image files match"}]
        else:
            out.append(path)
    return out


def _decode(item, lm: LoadedModel):
    """(tensor, None) or (None, error message) for one input."""
    if isinstance(item, dict):
        return None, item["error"]
    try:
        if isinstance(item, Image.Image):
            return image_to_tensor(item, lm.image_size, lm.in_channels), None
        if item.is_dir():
            raise IsADirectoryError("is a directory")
        return read_image(item, lm.image_size, lm.in_channels), None
    except FileNotFoundError:
        return None, "no such file"
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        return None, ("not a readable image" if isinstance(e, UnidentifiedImageError) else
                      first_line(e))


def decode_batch(pool: ThreadPoolExecutor, items: list, lm: LoadedModel):
    """Start decoding `items` in `pool`, a chunk per worker (one task per image would cost
    more in futures than a small image costs to decode); returns a callable that waits and
    gives [(tensor or None, error or None)] in order."""
    workers = max(1, pool._max_workers)
    size = -(-len(items) // workers) or 1
    chunks = [pool.submit(lambda chunk: [_decode(item, lm) for item in chunk],
                          items[i:i + size]) for i in range(0, len(items), size)]
    return lambda: [d for chunk in chunks for d in chunk.result()]


def iter_predictions(lm: LoadedModel, items: list, *, top_k: int, runtime: Runtime,
                     batch_size: int = 64) -> Iterator[dict]:
    """Results in input order, a batch at a time: the next batch decodes in the thread pool
    while this one is inferred."""
    known = set(lm.classes)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        upcoming = decode_batch(pool, batches[0], lm) if batches else None
        for i, batch in enumerate(batches):
            decoded = upcoming()
            if i + 1 < len(batches):
                upcoming = decode_batch(pool, batches[i + 1], lm)
            tensors = [x for x, _ in decoded if x is not None]
            if tensors:
                probs = predict_tensor(lm, torch.stack(tensors), runtime)
                ranked = top_classes(lm, probs, top_k)
                extra = label_sets(lm, probs)
            j = 0
            for item, (x, error) in zip(batch, decoded):
                name = item["file"] if isinstance(item, dict) else \
                    "<image>" if isinstance(item, Image.Image) else str(item)
                if x is None:
                    yield {"file": name, "error": error}
                    continue
                result = {"file": name, "predictions": ranked[j], **extra[j]}
                if isinstance(item, Path) and item.parent.name in known:
                    result["label"] = item.parent.name
                j += 1
                yield result


def top_classes(lm: LoadedModel, probs: torch.Tensor, top_k: int) -> list[list[dict]]:
    """Per image, its `top_k` classes as [{"class", "probability"}, ...], best first."""
    top = probs.topk(max(1, min(top_k, len(lm.classes))), dim=1)
    return [[{"class": lm.classes[c], "probability": p} for p, c in zip(values, indices)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist())]


def label_sets(lm: LoadedModel, probs: torch.Tensor) -> list[dict]:
    """Per image, what a multi-label model adds to its result: "labels", every label whose
    probability reaches its threshold (best first; possibly none), and "probabilities" of
    every label. Nothing for a single-label model."""
    if not lm.multi_label:
        return [{} for _ in range(len(probs))]
    called = over_thresholds(probs, lm.thresholds)
    out = []
    for p, c in zip(probs.tolist(), called.tolist()):
        order = sorted((k for k in range(len(p)) if c[k]), key=lambda k: -p[k])
        out.append({"labels": [lm.classes[k] for k in order],
                    "probabilities": dict(zip(lm.classes, p))})
    return out


@torch.inference_mode()
def predict_tensor(lm: LoadedModel, images: torch.Tensor, runtime: Runtime,
                   batch_size: int = 256) -> torch.Tensor:
    """Probabilities (N, K) for a uint8 batch already at the model's input size: softmax,
    or for a multi-label model a sigmoid per label."""
    out = []
    for chunk in images.split(batch_size):
        x = chunk if lm.takes_pixels else to_input(
            chunk.to(runtime.device), lm.mean, lm.std, memory_format=runtime.memory_format)
        logits = lm.model(x).float()
        out.append((logits.sigmoid() if lm.multi_label else logits.softmax(1)).cpu())
    return torch.cat(out)


def table_columns(top_k: int, multi_label: bool = False) -> list[str]:
    """The columns of a prediction table (the CSV, the DataFrame); a multi-label model's
    has "labels" second: the labels over their thresholds, joined with '|'."""
    columns = ["file", "labels", "predicted", "probability"] if multi_label else \
        ["file", "predicted", "probability"]
    for i in range(2, top_k + 1):
        columns += [f"class_{i}", f"probability_{i}"]
    return columns + ["label", "error"]


def table_row(r: dict, top_k: int, multi_label: bool = False) -> list:
    """One result as a row of `table_columns`: empty cells where it has no value."""
    row = [r["file"]] + (["|".join(r.get("labels", []))] if multi_label else [])
    preds = r.get("predictions", [])
    for i in range(top_k):
        row += [preds[i]["class"], preds[i]["probability"]] if i < len(preds) else ["", None]
    return row + [r.get("label", ""), r.get("error", "")]


def write_csv(results: Iterable[dict], path: Path, top_k: int, multi_label: bool = False
              ) -> Iterator[dict]:
    """Pass results through, writing each as a CSV row as it comes (flushed, so a long run
    can be watched and a crash keeps what was done): file, (multi-label: the labels called,)
    predicted class and probability, the next classes and probabilities, the true label
    (from the folder name) and any error."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table_columns(top_k, multi_label))
        for r in results:
            writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else v
                             for v in table_row(r, top_k, multi_label)])
            f.flush()
            yield r


def accuracy_line(results: list[dict]) -> str | None:
    """'accuracy 0.8500 on 200 images whose folder names their class', or None."""
    labelled = [r for r in results if "label" in r]
    if not labelled:
        return None
    if "labels" in labelled[0]:  # multi-label: the folder names one label of each image
        found = sum(r["label"] in r["labels"] for r in labelled)
        return f"the folder's label called for {found} of {len(labelled)} images whose " \
               "folder names a label"
    right = sum(r["predictions"][0]["class"] == r["label"] for r in labelled)
    return f"accuracy {right / len(labelled):.4f} on {len(labelled)} images whose folder " \
           "names their class"


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            continue  # errors go to stderr, one line each
        preds = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        if "labels" in r:  # multi-label: the labels called, then the most probable ones
            preds = f"{'|'.join(r['labels']) or '(no label)'}  ({preds})"
        lines.append(f"{r['file']}: {preds}")
    return "\n".join(lines)

"""`doctor`: what is wrong with a data set, found by the models trained on it.

Every image gets a probability from a model that never trained on it (K models, one per
fold, each the recipe's run on the other folds). From those:
- likely label errors: confident learning (cleanlab's `find_label_issues`, Northcutt et
  al. 2021), ranked, each with its given and suggested label;
- duplicates and leaks: identical pixels (a hash), and pairs whose penultimate features
  (the input of each model's classifier, averaged over the K models) or whose thumbnails
  (resizing and re-encoding barely change them) have a cosine similarity above a
  threshold; a pair is a leak when it crosses splits and a conflict when its labels differ;
- class balance and each class's label quality (cleanlab's per-class estimates).
Written to one folder: findings.csv, doctor.json, pictures, report.html, the fold runs,
and with `fix` a clean.csv listing for `cnnkit train --data clean.csv`. The user's data
is only read.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write, load
from .recipes import make_config
from .data import Dataset, Split, StreamSplit
from .device import select_runtime
from .engine import embed
from .errors import SettingsError
from .plots import plot_class_balance, plot_image_pairs, plot_images
from .report import html_page, html_table, img_tag
from .runs import RunFolder
from .setup import input_settings, load_data, preflight
from .train import train

DEFAULT_FOLDS = 4
# Cosine similarity of centred penultimate features (averaged over the fold models) above
# which two images are near-duplicates: 2 of the 13 million pairs of distinct images of the
# CIFAR subset score above it (benchmarks/RESULTS.md, doctor).
DEFAULT_SIMILARITY = 0.95
# The same for thumbnails (see `thumbnails`): copies resized and saved as JPEG score above
# 0.994 on the CIFAR subset, the most similar pair of distinct images 0.974.
PIXEL_SIMILARITY = 0.985
PICTURED = 24  # label issues and duplicate pairs drawn


@dataclass
class Pool:
    """Every image of the data set once, with where the user has it."""
    images: torch.Tensor
    labels: torch.Tensor
    split: list[str]       # the split it is in, as `cnnkit train` with the same settings splits
    position: list[int]    # its index in that split
    files: list[str | None]

    @classmethod
    def of(cls, ds: Dataset) -> "Pool":
        parts = []
        for name, s in ds.splits.items():
            if isinstance(s, StreamSplit):  # doctor looks at every image: decode them all
                s = Split(s.head(len(s)), s.labels, list(s.files))
            parts.append((name, s))
        return cls(torch.cat([s.images for _, s in parts]), torch.cat([s.labels for _, s in parts]),
                   [n for n, s in parts for _ in range(len(s))],
                   [i for _, s in parts for i in range(len(s))],
                   [str(f) if f is not None else None for _, s in parts
                    for f in (s.files or [None] * len(s))])

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        """How the user finds image i: its file, or its split and index in it."""
        return self.files[i] or f"{self.split[i]}[{self.position[i]}]"


@dataclass
class DoctorResult:
    out: Path
    accuracy: float                 # of the out-of-sample predictions
    label_issues: list[dict]        # most likely first
    duplicates: list[dict]          # exact first, then by similarity
    classes: list[dict]
    report: Path
    clean: Path | None = None
    probs: torch.Tensor = field(repr=False, default=None)  # (N, K) out-of-sample


def doctor(data: str, *, folds: int = DEFAULT_FOLDS, out: str | Path | None = None,
           similarity: float = DEFAULT_SIMILARITY, fix: bool = False,
           log: Callable[[str], None] = print, progress: bool | None = None,
           **settings) -> DoctorResult:
    """Look for label errors, duplicates, leaks and imbalance in `data` (any --data
    source) with `folds` models trained by the recipe (`settings` as for `train`, e.g.
    time_budget=60 per fold). Writes into `out` (default runs/doctor-NAME)."""
    if folds < 2:
        raise SettingsError(f"--folds must be at least 2 (each image is predicted by a model "
                            f"trained on the other folds), got {folds}")
    if not 0 < similarity <= 1:
        raise SettingsError(f"--similarity is a cosine similarity in (0, 1], got {similarity}")
    cfg = make_config(data=data, **settings)
    preflight(cfg, check_out=False)
    cfg, _ = input_settings(cfg)
    ds = load_data(cfg)
    if ds.multi_label:
        raise SettingsError("cnnkit doctor looks for wrong labels among single-label data; "
                            f"{data} is multi-label (several labels per image)")
    pool = Pool.of(ds)
    counts = Counter(pool.labels.tolist())
    if min(counts.get(c, 0) for c in range(len(ds.classes))) < folds:
        rare = [ds.classes[c] for c in range(len(ds.classes)) if counts.get(c, 0) < folds]
        raise SettingsError(f"class(es) {', '.join(rare)} have fewer images than --folds "
                            f"{folds}: every fold needs each class; lower --folds or add images")
    runtime = select_runtime(cfg.device, amp=cfg.amp)
    with RunFolder(None, str(out) if out else None, f"doctor-{ds.name}", resume=False) as where:
        log(f"doctor: {ds.name}: {len(pool)} images ({_split_counts(pool)}), "
            f"{len(ds.classes)} classes; {folds} models, each trained on {folds - 1} folds "
            f"({cfg.model}, recipe {cfg.recipe}) and predicting the other; writing {where}")
        probs, features, seconds = _cross_validate(cfg, ds, pool, folds, where, runtime,
                                                   log, progress)
        accuracy = float((probs.argmax(1) == pool.labels).double().mean())
        log(f"out-of-sample accuracy {accuracy:.4f} ({seconds:.0f}s of training)")
        issues = label_issues(pool.labels, probs)
        pairs = duplicate_pairs(pool.images, features, similarity)
        classes = class_health(pool, probs, ds.classes, issues)
        issue_rows = [_issue_row(pool, ds.classes, probs, i, rank)
                      for rank, i in enumerate(issues, 1)]
        pair_rows = [_pair_row(pool, ds.classes, p) for p in pairs]
        summary = _summary(pool, ds, folds, accuracy, issue_rows, pair_rows, seconds,
                           similarity, cfg)
        _write_findings(where, issue_rows, pair_rows)
        atomic_write(where / "doctor.json", lambda f: f.write(json.dumps(
            {"summary": summary, "classes": classes, "label_issues": issue_rows,
             "duplicates": pair_rows}, indent=2).encode()))
        pictures = _draw(where, pool, ds.classes, issue_rows, pair_rows, classes)
        report = where / "report.html"
        page = _html(summary, classes, issue_rows, pair_rows, pictures)
        atomic_write(report, lambda f: f.write(page.encode()))
        clean = write_clean_listing(where, pool, ds.classes, issue_rows, pair_rows) \
            if fix else None
    result = DoctorResult(where, accuracy, issue_rows, pair_rows, classes, report, clean, probs)
    for line in _findings_lines(summary, issue_rows, pair_rows, classes):
        log(line)
    log(f"report: {report}" + (f"; a listing without the flagged images: {clean} "
                               f"(cnnkit train --data {clean})" if clean else ""))
    return result


def _cross_validate(cfg, ds: Dataset, pool: Pool, folds: int, where: Path, runtime, log,
                    progress) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Out-of-sample probabilities of every image, and its penultimate features from every
    fold's model (centred, unit length, concatenated and scaled so that a dot product is
    the mean cosine similarity over the models)."""
    from sklearn.model_selection import StratifiedKFold
    whole = Split(pool.images, pool.labels)
    probs = torch.zeros(len(pool), len(ds.classes))
    features, seconds = [], 0.0
    splitter = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed)
    for k, (rest, held) in enumerate(splitter.split(np.zeros(len(pool)), pool.labels.numpy())):
        fold = Dataset(ds.name, ds.source, ds.classes, whole.subset(rest), whole.subset(held),
                       "val", held_out=True)
        start = time.perf_counter()
        # a fold's own pictures would cost seconds each and nobody looks at them
        run = train(dataclasses.replace(cfg, out=str(where / "folds" / f"fold-{k + 1}"),
                                        plots=False),
                    dataset=fold, log=_quiet, progress=progress)
        seconds += time.perf_counter() - start
        ev = run.final  # the fold's model evaluated on its held-out images, as the run does
        probs[torch.as_tensor(held)] = ev.probs
        lm = load(run.run_dir / "last.pt", runtime.device)
        f = embed(lm.model, whole, mean=lm.mean, std=lm.std, runtime=runtime)
        f = f - f.mean(0)
        features.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-12))
        log(f"fold {k + 1}/{folds}: trained on {len(rest)} images in "
            f"{sum(m['seconds'] for m in run.metrics):.1f}s; {ev.accuracy:.4f} on its "
            f"{len(held)} held-out images")
    return probs, torch.cat(features, 1) / folds ** 0.5, seconds


def _quiet(message: str) -> None:
    pass


def label_issues(labels: torch.Tensor, probs: torch.Tensor) -> list[int]:
    """Indices of likely label errors, most likely first (cleanlab's confident learning,
    ranked by self-confidence). filter_by="both" (flagged by both of cleanlab's pruning
    rules) measured 0.61 precision and 0.81 recall on the CIFAR subset with 10% of labels
    flipped, against 0.51 and 0.83 for its default (benchmarks/RESULTS.md, doctor)."""
    from cleanlab.filter import find_label_issues
    found = find_label_issues(labels.numpy(), probs.double().numpy(),
                              filter_by="both", return_indices_ranked_by="self_confidence",
                              n_jobs=1)
    return [int(i) for i in found]


def duplicate_pairs(images: torch.Tensor, features: torch.Tensor, threshold: float,
                    pixel_threshold: float = PIXEL_SIMILARITY) -> list[dict]:
    """Pairs (a < b) of identical pixels ("exact"), or ("near") whose feature similarity
    is at least `threshold` or whose thumbnails' at least `pixel_threshold`: exact ones
    first, then the most similar. Each pair carries both similarities."""
    groups: dict[bytes, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(hashlib.blake2b(im.numpy().tobytes(), digest_size=16).digest(),
                          []).append(i)
    exact = {(a, b) for members in groups.values()
             for x, a in enumerate(members) for b in members[x + 1:]}
    pixels = thumbnails(images)
    near = (_pairs_above(features, threshold) | _pairs_above(pixels, pixel_threshold)) - exact
    pairs = [{"kind": kind, "a": a, "b": b,
              "feature_similarity": float(features[a] @ features[b]),
              "pixel_similarity": float(pixels[a] @ pixels[b])}
             for kind, found in (("exact", exact), ("near", near)) for a, b in found]
    return sorted(pairs, key=lambda p: (p["kind"] != "exact",
                                        -max(p["feature_similarity"], p["pixel_similarity"]),
                                        p["a"], p["b"]))


def thumbnails(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Each image as a small picture (area-averaged to size×size, its own mean taken out,
    unit length): resizing and re-encoding barely move it, where they move a CNN's
    features (a 32-pixel copy saved as a 64-pixel JPEG: 0.76 to 0.92 in features, above
    0.994 here; benchmarks/RESULTS.md, doctor)."""
    x = images.float() / 255
    if min(x.shape[2:]) > size:
        x = torch.nn.functional.adaptive_avg_pool2d(x, size)
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _pairs_above(vectors: torch.Tensor, threshold: float, chunk: int = 2048) -> set:
    """Index pairs (a < b) of unit vectors whose dot product is at least `threshold`."""
    found = set()
    for start in range(0, len(vectors), chunk):
        rows, cols = torch.nonzero(vectors[start:start + chunk] @ vectors.T >= threshold,
                                   as_tuple=True)
        found |= {(start + r, c) for r, c in zip(rows.tolist(), cols.tolist()) if start + r < c}
    return found


def class_health(pool: Pool, probs: torch.Tensor, classes: list[str],
                 issues: list[int]) -> list[dict]:
    """Per class: images in each split, label issues, and cleanlab's estimates of its
    label noise and label quality (1 = clean), worst quality first."""
    from cleanlab.dataset import rank_classes_by_label_quality
    quality = rank_classes_by_label_quality(labels=pool.labels.numpy(),
                                            pred_probs=probs.double().numpy())
    flagged = Counter(int(pool.labels[i]) for i in issues)
    splits = sorted(set(pool.split), key=pool.split.index)
    rows = []
    for r in quality.to_dict("records"):
        c = int(r["Class Index"])
        members = (pool.labels == c).nonzero().flatten().tolist()
        rows.append({"class": classes[c], "images": len(members),
                     **{s: sum(pool.split[i] == s for i in members) for s in splits},
                     "label_issues": flagged.get(c, 0),
                     "label_noise": float(r["Label Noise"]),
                     "label_quality": float(r["Label Quality Score"])})
    return rows


def _issue_row(pool: Pool, classes, probs, i: int, rank: int) -> dict:
    suggested = int(probs[i].argmax())
    return {"rank": rank, "image": pool.name(i), "index": i, "split": pool.split[i],
            "given": classes[int(pool.labels[i])], "suggested": classes[suggested],
            "confidence": round(float(probs[i, suggested]), 4),
            "given_probability": round(float(probs[i, int(pool.labels[i])]), 4)}


def _pair_row(pool: Pool, classes, p: dict) -> dict:
    a, b = p["a"], p["b"]
    return {"kind": p["kind"], "feature_similarity": round(p["feature_similarity"], 4),
            "pixel_similarity": round(p["pixel_similarity"], 4),
            "image": pool.name(a), "index": a, "split": pool.split[a],
            "label": classes[int(pool.labels[a])],
            "other": pool.name(b), "other_index": b, "other_split": pool.split[b],
            "other_label": classes[int(pool.labels[b])],
            "leak": pool.split[a] != pool.split[b],
            "conflict": bool(pool.labels[a] != pool.labels[b])}


FINDING_COLUMNS = ["finding", "rank", "image", "split", "label", "suggested_label",
                   "confidence", "other_image", "other_split", "other_label",
                   "feature_similarity", "pixel_similarity"]


def _write_findings(where: Path, issues: list[dict], pairs: list[dict]) -> None:
    """findings.csv: a row per likely label error, then per duplicate pair."""
    rows = [["label_issue", r["rank"], r["image"], r["split"], r["given"], r["suggested"],
             r["confidence"], "", "", "", "", ""] for r in issues]
    rows += [[f"{p['kind']}_duplicate" + ("_leak" if p["leak"] else ""), rank, p["image"],
              p["split"], p["label"], "", "", p["other"], p["other_split"], p["other_label"],
              p["feature_similarity"], p["pixel_similarity"]] for rank, p in enumerate(pairs, 1)]
    _write_csv(where / "findings.csv", FINDING_COLUMNS, rows)


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_clean_listing(where: Path, pool: Pool, classes: list[str], issues: list[dict],
                        pairs: list[dict]) -> Path:
    """clean.csv (path,label rows) of every training and validation image that was not
    flagged: no likely label error, and of each duplicate pair only the first. A test
    split stays apart, untouched. Images that are not files (CIFAR batches, built-in sets)
    are written as PNGs under images/; the user's files are only listed."""
    drop = {r["index"] for r in issues} | {p["other_index"] for p in pairs}
    keep = [i for i in range(len(pool)) if i not in drop and pool.split[i] != "test"]
    rows = []
    for i in keep:
        path = pool.files[i]
        if path is None:
            path = where / "images" / classes[int(pool.labels[i])] / \
                f"{pool.split[i]}-{pool.position[i]:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = pool.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
        rows.append((str(Path(path).resolve()), classes[int(pool.labels[i])]))
    _write_csv(where / "clean.csv", ["path", "label"], rows)
    return where / "clean.csv"


def _split_counts(pool: Pool) -> str:
    return ", ".join(f"{n} {s}" for s, n in Counter(pool.split).items())


def _summary(pool, ds, folds, accuracy, issues, pairs, seconds, similarity, cfg) -> dict:
    return {"data": ds.source, "images": len(pool), "splits": dict(Counter(pool.split)),
            "classes": len(ds.classes), "folds": folds, "model": cfg.model,
            "recipe": cfg.recipe, "training_seconds": round(seconds, 1),
            "out_of_sample_accuracy": round(accuracy, 4), "label_issues": len(issues),
            "label_issue_fraction": round(len(issues) / len(pool), 4),
            "exact_duplicate_pairs": sum(p["kind"] == "exact" for p in pairs),
            "near_duplicate_pairs": sum(p["kind"] == "near" for p in pairs),
            "feature_similarity_threshold": similarity,
            "pixel_similarity_threshold": PIXEL_SIMILARITY,
            "leaks": sum(p["leak"] for p in pairs),
            "conflicting_duplicates": sum(p["conflict"] for p in pairs)}


def _findings_lines(summary: dict, issues, pairs, classes) -> list[str]:
    lines = [f"likely label errors: {summary['label_issues']} "
             f"({100 * summary['label_issue_fraction']:.1f}% of the images)"]
    lines += [f"  {r['image']}: labelled {r['given']}, looks like {r['suggested']} "
              f"({r['confidence']:.2f})" for r in issues[:5]]
    lines.append(f"duplicates: {summary['exact_duplicate_pairs']} exact and "
                 f"{summary['near_duplicate_pairs']} near pairs (features ≥ "
                 f"{summary['feature_similarity_threshold']:g} or thumbnails ≥ "
                 f"{summary['pixel_similarity_threshold']:g}); {summary['leaks']} cross splits "
                 f"(leaks), {summary['conflicting_duplicates']} with different labels")
    sizes = [c["images"] for c in classes]
    worst = min(classes, key=lambda c: c["label_quality"])
    lines.append(f"classes: {min(sizes)} to {max(sizes)} images each (ratio "
                 f"{max(sizes) / max(min(sizes), 1):.1f}); lowest label quality: "
                 f"{worst['class']} ({worst['label_quality']:.2f})")
    return lines


def _draw(where: Path, pool: Pool, classes, issues, pairs, class_rows) -> dict[str, Path]:
    pictures = {}
    if issues:
        top = issues[:PICTURED]
        pictures["Likely label errors"] = plot_images(
            pool.images[[r["index"] for r in top]],
            [f"#{r['rank']} given {r['given']}\nlooks {r['suggested']} {r['confidence']:.2f}"
             for r in top], where / "label-issues.png",
            "likely label errors, most likely first (out-of-sample predictions)")
    if pairs:
        top = pairs[:PICTURED // 2]
        pictures["Duplicates"] = plot_image_pairs(
            pool.images[[p["index"] for p in top]], pool.images[[p["other_index"] for p in top]],
            [f"{p['split']} {p['label']}" for p in top],
            [f"{p['other_split']} {p['other_label']}\n{p['kind']} "
             f"{p['feature_similarity']:.2f}/{p['pixel_similarity']:.3f}"
             for p in top], where / "duplicates.png")
    pictures["Class balance"] = plot_class_balance(class_rows, sorted(
        set(pool.split), key=pool.split.index), where / "class-balance.png")
    return pictures


def _html(summary, classes, issues, pairs, pictures) -> str:
    splits = list(summary["splits"])
    overview = [(k.replace("_", " "), ", ".join(f"{n} {s}" for s, n in v.items())
                 if isinstance(v, dict) else v) for k, v in summary.items()]
    per_class = [(c["class"], c["images"], *(c[s] for s in splits), c["label_issues"],
                  f"{c['label_noise']:.3f}", f"{c['label_quality']:.3f}") for c in classes]
    suspects = [(r["rank"], r["image"], r["split"], r["given"], r["suggested"],
                 f"{r['confidence']:.3f}") for r in issues[:50]]
    duplicates = [(p["kind"], f"{p['feature_similarity']:.4f}", f"{p['pixel_similarity']:.4f}",
                   p["image"], p["split"], p["label"], p["other"], p["other_split"],
                   p["other_label"], "leak" if p["leak"] else "",
                   "labels differ" if p["conflict"] else "") for p in pairs[:50]]
    none = "<p>none found</p>"
    sections = [
        ("Summary", html_table(overview)),
        ("Classes", html_table(per_class, ["class", "images", *splits, "label issues",
                                           "label noise", "label quality"])),
        *[(name, img_tag(path)) for name, path in pictures.items()],
        ("Likely label errors (top 50)", html_table(suspects, [
            "rank", "image", "split", "given label", "suggested", "confidence"])
         if issues else none),
        ("Duplicate pairs (top 50)", html_table(duplicates, [
            "kind", "features", "pixels", "image", "split", "label", "other image", "split",
            "label", "", ""]) if pairs else none)]
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    return html_page("cnnkit doctor", summary["data"], body)

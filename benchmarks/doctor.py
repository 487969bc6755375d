"""`cnnkit doctor` against planted problems on the real CIFAR-10 subset.

The 5,085 images are written as a train/ (80%) and val/ (20%) folder of PNGs; then
- a seeded NOISE fraction of them is moved to a wrong class folder (a random other class):
  the label errors to find;
- COPIES training images are copied into val/ (same class): half as exact PNG copies, half
  upscaled to 64 pixels and saved as JPEG (quality 85): the leaks to find.
`cnnkit doctor` runs with its defaults; the flagged set is compared with the flipped one
(precision, recall) and the planted pairs are looked up among its duplicate pairs.

    python benchmarks/doctor.py --noise 0.05 0.10 0.20 [--json benchmarks/doctor.json]
    python benchmarks/doctor.py --noise 0 --keep docs-doctor   # the clean subset's findings
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py"


def read_subset():
    images, labels = [], []
    for k in range(1, 6):
        with open(SUBSET / f"data_batch_{k}", "rb") as f:
            d = pickle.load(f, encoding="latin1")
        images.append(np.asarray(d["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += d["labels"]
    with open(SUBSET / "batches.meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names"]
    return np.concatenate(images), np.array(labels), classes


def build(root: Path, noise: float, copies: int, seed: int):
    """The folder data set; returns (flipped file names, planted (original, copy) names)."""
    images, labels, classes = read_subset()
    rng = np.random.default_rng(seed)
    n = len(labels)
    val = np.zeros(n, bool)
    for c in range(len(classes)):  # 20% of each class to val/
        members = np.flatnonzero(labels == c)
        val[rng.choice(members, round(0.2 * len(members)), replace=False)] = True
    given = labels.copy()
    flipped = rng.choice(n, round(noise * n), replace=False)
    given[flipped] = (labels[flipped] + rng.integers(1, len(classes), len(flipped))) % len(classes)
    names = []
    for i in range(n):
        name = f"{'val' if val[i] else 'train'}/{classes[given[i]]}/{i:05d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / name)
        names.append(name)
    clean_train = np.setdiff1d(np.flatnonzero(~val), flipped)
    planted = []
    for k, i in enumerate(rng.choice(clean_train, copies, replace=False)):
        im = Image.fromarray(images[i])
        if k % 2 == 0:
            copy = f"val/{classes[given[i]]}/copy-{i:05d}.png"
            im.save(root / copy)
        else:
            copy = f"val/{classes[given[i]]}/copy-{i:05d}.jpg"
            im.resize((64, 64), Image.BICUBIC).save(root / copy, quality=85)
        planted.append((names[i], copy))
    return {names[i] for i in flipped}, planted


def run(noise: float, copies: int, seed: int, keep: Path | None) -> dict:
    from cnnkit.doctor import doctor
    work = Path(tempfile.mkdtemp(prefix="doctor-bench-"))
    data = work / "data"
    flipped, planted = build(data, noise, copies, seed)
    out = keep or work / "out"
    start = time.perf_counter()
    result = doctor(str(data), out=out, progress=False)
    seconds = time.perf_counter() - start
    flagged = {str(Path(r["image"]).relative_to(data)) for r in result.label_issues}
    hits = len(flagged & flipped)
    pairs = {frozenset((str(Path(p["image"]).relative_to(data)),
                        str(Path(p["other"]).relative_to(data)))): p for p in result.duplicates}
    found = [pairs.get(frozenset(p)) for p in planted]
    row = {"noise": noise, "images": len(result.probs), "flipped": len(flipped),
           "flagged": len(flagged), "true_positives": hits,
           "precision": hits / max(len(flagged), 1), "recall": hits / max(len(flipped), 1),
           "out_of_sample_accuracy": result.accuracy,
           "planted_pairs": len(planted),
           "planted_found": sum(f is not None for f in found),
           "planted_exact_found": sum(f is not None and f["kind"] == "exact" for f in found),
           "planted_pixel_similarity_min": min((f["pixel_similarity"] for f in found if f),
                                               default=None),
           "planted_feature_similarity_min": min((f["feature_similarity"] for f in found if f),
                                                 default=None),
           "duplicate_pairs": len(result.duplicates),
           "leaks": sum(p["leak"] for p in result.duplicates),
           "seconds": seconds, "out": str(out)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    p.add_argument("--copies", type=int, default=20, help="planted duplicate pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="write doctor's output here (one noise level)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = [run(noise, a.copies, a.seed, a.keep) for noise in a.noise]
    if a.json:
        a.json.write_text(json.dumps({
            "date": str(date.today()), "command": " ".join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

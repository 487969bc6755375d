"""`cnnkit predict` over many image files with --csv, against decoding alone, in one run.

Writes N PNG files from the real CIFAR-10 subset (repeating it under new names), trains a
short default run on the subset for a real model, then times (alternating, median of
--rounds): decoding every file alone (the thread pool predict uses, read_image) and the
whole prediction with a CSV written (`cnnkit.predict(run, [folder], recursive=True,
csv_path=...)`).

    python benchmarks/predict.py --files 10000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

import cnnkit
from cnnkit.data import read_image

SUBSET = "../shared/data/cifar10-subset/cifar-10-batches-py"


def write_files(folder: Path, n: int) -> list[Path]:
    ds = cnnkit.load_dataset(SUBSET, val_fraction=0.2)
    images = torch.cat([ds.train.images, ds.val.images])
    labels = torch.cat([ds.train.labels, ds.val.labels])
    files = []
    for i in range(n):
        j = i % len(images)
        path = folder / ds.classes[int(labels[j])] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[j].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    return files


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/predict.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_files(tmp / "images", a.files)
        run = cnnkit.train(data=SUBSET, epochs=2, val_fraction=0.2, out=str(tmp / "run"),
                           log=lambda s: None).run_dir
        lm = cnnkit.load(run)

        def decode_alone():
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(pool.map(lambda f: read_image(f, lm.image_size, lm.in_channels), files))

        def predict_csv():
            out = tmp / "p.csv"
            out.unlink(missing_ok=True)
            r = cnnkit.predict(lm, [tmp / "images"], recursive=True, csv_path=out,
                               batch_size=a.batch_size, device="cpu")
            assert len(r) == a.files and not any("error" in x for x in r)

        times = {"decode alone": [], "predict with --csv": []}
        for _ in range(a.rounds):
            for name, fn in (("decode alone", decode_alone), ("predict with --csv", predict_csv)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rate = {k: a.files / statistics.median(v) for k, v in times.items()}
    ratio = rate["predict with --csv"] / rate["decode alone"]
    print(f"# {a.files} PNG files (32×32), fastnet 32/128/128, {torch.get_num_threads()} "
          f"threads, median of {a.rounds}")
    for k, v in rate.items():
        print(f"{k:<20} {v:8.0f} images/s")
    print(f"predict / decode alone: {ratio:.2f}")
    Path(a.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "files": a.files, "batch_size": a.batch_size,
        "seconds": times, "images_per_s": rate, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()

"""`cnnkit predict` over many image files with --csv, against decoding alone, in one run.

Writes N PNG files from the real CIFAR-10 subset (repeating it under new names), trains a
short default run on the subset for a real model, then times (alternating, median of
--rounds): decoding every file alone (predict's thread pool and chunks, `decode_batch`;
and, as in RESULTS section 8, one pool task per file) and the whole prediction with a CSV written (`cnnkit.predict(run, [folder], recursive=True,
csv_path=...)`), from the run itself (PyTorch) and from its ONNX exports, float and int8
(onnxruntime).

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
from cnnkit.export import export
from cnnkit.predict import decode_batch

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
    p.add_argument("--recipe", default="fast", help="the run's recipe (and so its model)")
    p.add_argument("--out", default="benchmarks/predict.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_files(tmp / "images", a.files)
        run = cnnkit.train(data=SUBSET, epochs=2, val_fraction=0.2, out=str(tmp / "run"),
                           recipe=a.recipe, log=lambda s: None).run_dir
        lm = cnnkit.load(run)
        models = {"run (PyTorch)": lm,
                  "float ONNX": cnnkit.load(export(run, tmp / "float.onnx")),
                  "int8 ONNX": cnnkit.load(export(run, tmp / "int8.onnx", int8=True,
                                                     max_drop=100))}  # speed only here

        def decode_alone():  # as predict decodes: its thread pool, its chunks of a batch
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for i in range(0, len(files), a.batch_size):
                    decoded = decode_batch(pool, files[i:i + a.batch_size], lm)()
                    assert all(x is not None for x, _ in decoded)

        def predict_csv(model):
            out = tmp / "p.csv"
            out.unlink(missing_ok=True)
            r = cnnkit.predict(model, [tmp / "images"], recursive=True, csv_path=out,
                               batch_size=a.batch_size, device="cpu")
            assert len(r) == a.files and not any("error" in x for x in r)

        def decode_each():  # one task per file: the reference of RESULTS section 8
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(pool.map(lambda f: read_image(f, lm.image_size, lm.in_channels), files))

        jobs = {"decode alone": decode_alone, "decode alone, a task per file": decode_each} | {
            f"predict {name} --csv": (lambda m=m: predict_csv(m)) for name, m in models.items()}
        times = {name: [] for name in jobs}
        for _ in range(a.rounds):
            for name, fn in jobs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rate = {k: a.files / statistics.median(v) for k, v in times.items()}
    widths = "/".join(map(str, lm.info.model_args.get("widths", [])))
    print(f"# {a.files} PNG files (32×32), recipe {a.recipe}: {lm.name} {widths}, {torch.get_num_threads()} "
          f"threads, median of {a.rounds}")
    for k, v in rate.items():
        print(f"{k:<32} {v:8.0f} images/s  {v / rate['decode alone']:.2f} of decode alone")
    Path(a.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "files": a.files, "batch_size": a.batch_size,
        "recipe": a.recipe, "model": lm.name, "widths": widths, "seconds": times, "images_per_s": rate,
        "ratio": {k: v / rate["decode alone"] for k, v in rate.items()}}, indent=2))


if __name__ == "__main__":
    main()

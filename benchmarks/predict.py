"""`cnnkit predict` over many image files with --csv, against decoding alone, in one run.

Writes N PNG files from the real CIFAR-10 subset (repeating it under new names), trains a
short default run on the subset for a real model, then times (alternating, median of
--rounds): decoding every file alone (predict's thread pool and chunks, `decode_batch`; and,
as in RESULTS section 8, one pool task per file); the whole prediction with a CSV written
(`cnnkit.predict(run, [folder], recursive=True, csv_path=...)`) from the run itself
(PyTorch), from its ONNX exports, float and int8 (onnxruntime), and from a model that costs
nothing (zeros), which times the pipeline alone; and each model alone on images decoded
beforehand, the most predict could reach with it.

`--photos` does the same over copies of hymenoptera's 398 JPEG photos (many sizes, decoded
with JPEG draft mode to 64 pixels) and a short 64-pixel run on them: what users bring, each
costing 7 times a 32-pixel PNG to decode.

    python benchmarks/predict.py --files 10000
    python benchmarks/predict.py --photos --files 2000 --out benchmarks/predict-photos.json

`--device cuda` infers on the GPU (decoding stays on the CPU's threads): the GPU check runs
it there (benchmarks/gpu_check.py, without the ONNX rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
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
from cnnkit.device import select_runtime
from cnnkit.predict import decode_batch, predict_tensor

SHARED = Path(os.environ.get("CNNKIT_SHARED_DATA", "../shared/data"))
SUBSET = str(SHARED / "cifar10-subset" / "cifar-10-batches-py")
PHOTOS = str(SHARED / "hymenoptera")


class Zeros(torch.nn.Module):
    """A model that costs nothing: what is left of predict's time is its pipeline."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return torch.zeros(len(x), self.num_classes, device=x.device)


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


def copy_photos(folder: Path, n: int) -> list[Path]:
    """n copies of hymenoptera's photos (both splits) under new names, class folders kept."""
    photos = sorted(Path(PHOTOS).glob("*/*/*.jpg"))
    files = []
    for i in range(n):
        src = photos[i % len(photos)]
        path = folder / src.parent.name / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        files.append(path)
    return files


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--recipe", default="fast", help="the run's recipe (and so its model)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument("--epochs", type=int, default=2, help="of the run that is predicted with")
    p.add_argument("--width", help="of the run's model (default: the recipe's)")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the run's float and int8 ONNX exports (onnxruntime, CPU)")
    p.add_argument("--photos", action="store_true", help="hymenoptera's JPEG photos at 64 "
                   "pixels instead of CIFAR's 32-pixel PNGs")
    p.add_argument("--run", help="predict with this run folder (default: train one for "
                   "--epochs on the subset, or on the photos)")
    p.add_argument("--out", default="benchmarks/predict.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.photos:
            files = copy_photos(tmp / "images", a.files)
            data = dict(data=PHOTOS, image_size=64)
        else:
            files = write_files(tmp / "images", a.files)
            data = dict(data=SUBSET, val_fraction=0.2)
        run = Path(a.run) if a.run else cnnkit.train(
            **data, epochs=a.epochs, width=a.width, out=str(tmp / "run"), recipe=a.recipe,
            device=a.device, plots=False, log=lambda s: None).run_dir
        runtime = select_runtime(a.device)
        lm = cnnkit.load(run, runtime.device)
        models = {"run (PyTorch)": lm,
                  "a model that costs nothing": dataclasses.replace(
                      lm, model=Zeros(len(lm.classes)))}
        if a.onnx:
            models |= {"float ONNX": cnnkit.load(export(run, tmp / "float.onnx")),
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
                               batch_size=a.batch_size, device=a.device)
            assert len(r) == a.files and not any("error" in x for x in r)

        def decode_each():  # one task per file: the reference of RESULTS section 8
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(pool.map(lambda f: read_image(f, lm.image_size, lm.in_channels), files))

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            decoded = torch.stack([x for x, _ in decode_batch(pool, files, lm)()])

        def model_alone(model):  # the forward passes alone, on images decoded beforehand
            for batch in decoded.split(a.batch_size):  # (an ONNX export ignores runtime)
                predict_tensor(model, batch, runtime)

        jobs = {"decode alone": decode_alone, "decode alone, a task per file": decode_each} | {
            f"predict {name} --csv": (lambda m=m: predict_csv(m)) for name, m in models.items()
        } | {f"model alone: {name}": (lambda m=m: model_alone(m)) for name, m in models.items()
             if not isinstance(m.model, Zeros)}
        times = {name: [] for name in jobs}
        for _ in range(a.rounds):
            for name, fn in jobs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rate = {k: a.files / statistics.median(v) for k, v in times.items()}
    widths = "/".join(map(str, lm.info.model_args.get("widths", [])))
    kind = "JPEG photos (64×64)" if a.photos else "PNG files (32×32)"
    print(f"# {a.files} {kind} on {a.device}, recipe {a.recipe}: {lm.name} {widths}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, median of {a.rounds}")
    for k, v in rate.items():
        print(f"{k:<32} {v:8.0f} images/s  {v / rate['decode alone']:.2f} of decode alone")
    Path(a.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "files": a.files, "batch_size": a.batch_size,
        "files_kind": kind, "device": a.device, "cores": os.cpu_count(), "recipe": a.recipe,
        "model": lm.name, "widths": widths, "seconds": times, "images_per_s": rate,
        "ratio": {k: v / rate["decode alone"] for k, v in rate.items()}}, indent=2))


if __name__ == "__main__":
    main()

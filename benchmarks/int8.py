"""int8 against float: a run exported twice (`cnnkit export --format onnx`, with and without
`--int8`), both run by onnxruntime, PyTorch beside them; images/s at batch 1 and 64 (median
of 5 timings, alternating) and validation accuracy.

    python benchmarks/int8.py RUN [--json benchmarks/int8.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cnnkit
from cnnkit.checkpoint import OnnxModel
from cnnkit.export import PixelModel, compare_on_val, export


def images_per_s(model, images: torch.Tensor, batch: int, seconds: float = 1.0) -> float:
    chunks = list(images.split(batch))
    model(chunks[0])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for chunk in chunks:
            model(chunk)
            done += len(chunk)
    return done / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    lm = cnnkit.load(a.run, "cpu")
    data = lm.info.load_data()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export(a.run, Path(tmp) / "float.onnx")
        int8 = export(a.run, Path(tmp) / "int8.onnx", int8=True)
        # PyTorch as `cnnkit predict` runs it on a CPU: channels_last
        torch_model = PixelModel(lm.model, lm.mean, lm.std).eval().to(
            memory_format=torch.channels_last)
        models = {"pytorch": lambda x: torch_model(x.contiguous(
                      memory_format=torch.channels_last)),
                  "onnxruntime float": OnnxModel(fp32), "onnxruntime int8": OnnxModel(int8)}
        images = data.val.head(1024)
        rows = {name: {1: [], 64: []} for name in models}
        with torch.inference_mode():
            for _ in range(5):
                for name, model in models.items():
                    for batch in (1, 64):
                        rows[name][batch].append(images_per_s(model, images[:256 if batch == 1
                                                                            else 1024], batch))
            quality = compare_on_val(models["onnxruntime float"], models["onnxruntime int8"],
                                     data.val)
    result = {"run": a.run, "model": lm.name, "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "threads":
              torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "images_per_s": {name: {b: round(statistics.median(v), 1) for b, v in r.items()}
                               for name, r in rows.items()}, "accuracy": quality}
    print("| runtime | batch 1 images/s | batch 64 images/s |")
    print("|---|---|---|")
    for name, r in result["images_per_s"].items():
        print(f"| {name} | {r[1]:,.0f} | {r[64]:,.0f} |")
    print(json.dumps(quality))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

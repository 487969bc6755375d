"""Training throughput per model on synthetic 32×32 images (compute does not depend on
content): images/s of a whole training step, of the data pipeline alone, FLOPs per
training image (torch.utils.flop_counter), and achieved GFLOP/s against this machine's
float32 matrix-product peak, measured in the same run.

    python benchmarks/throughput.py [--device cpu|cuda] [--models fastnet resnet9 ...]
        [--batch-sizes 128 256 512] [--steps 10] [--threads 2]

On CUDA, steps are timed with CUDA events after warm-up; on the CPU with perf_counter.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnkit.config import fill_recipe_defaults, make_config, parse_widths
from cnnkit.device import select_runtime
from cnnkit.models import create_model
from cnnkit.optim import build_optimizer
from cnnkit.transforms import Augment, to_input


def timer(runtime):
    if runtime.device.type == "cuda":
        def measure(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def measure(fn, n):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - start
    return measure


def matmul_peak(runtime, n=2048, reps=10) -> float:
    """float32 GFLOP/s of a large square matrix product (bf16 on CUDA, the training dtype)."""
    dtype = runtime.dtype
    a = torch.randn(n, n, device=runtime.device, dtype=dtype)
    b = torch.randn(n, n, device=runtime.device, dtype=dtype)
    measure = timer(runtime)
    measure(lambda: a @ b, 3)
    seconds = measure(lambda: a @ b, reps)
    return 2 * n ** 3 * reps / seconds / 1e9


def train_flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_model(name, width, batch, steps, runtime, images, labels):
    cfg = fill_recipe_defaults(make_config(model=name, width=width, batch_size=batch),
                               len(images), runtime.device.type)
    args = {"widths": parse_widths(width)} if width else {}
    model = create_model(name, num_classes=10, **args).to(runtime.device,
                                                           memory_format=runtime.memory_format)
    opt = build_optimizer(model, cfg)
    aug = Augment("alternate", 2, 0)
    g = torch.Generator(device=runtime.device).manual_seed(0)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    n = len(images)
    state = {"i": 0}

    def batch_only():
        i = state["i"] = (state["i"] + batch) % (n - batch)
        idx = torch.arange(i, i + batch, device=runtime.device)
        x = aug(to_input(images[idx], mean, std), idx, 1, g)
        return x.contiguous(memory_format=runtime.memory_format), labels[idx]

    def step():
        x, y = batch_only()
        with torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.autocast):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x, y = batch_only()
    flops = train_flops(model, x[:1].float(), y[:1])  # per image: forward + backward
    measure = timer(runtime)
    measure(step, 3)
    step_s = measure(step, steps) / steps
    measure(batch_only, 3)
    data_s = measure(batch_only, steps) / steps
    return {"model": name, "width": width or "default", "batch": batch,
            "train_img_s": batch / step_s, "data_img_s": batch / data_s,
            "data_share": data_s / step_s, "mflops_per_train_img": flops / 1e6,
            "achieved_gflops": flops * batch / step_s / 1e9}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="+", default=["fastnet:32,128,128", "fastnet", "resnet9",
                                                   "resnet18", "seed-cnn", "seed-simple"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runtime = select_runtime(a.device)
    images = torch.randint(0, 256, (a.images, 3, 32, 32), dtype=torch.uint8, device=runtime.device)
    labels = torch.randint(0, 10, (a.images,), device=runtime.device)
    peak = matmul_peak(runtime)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{runtime.device}, {a.threads} threads; matmul peak {peak:.0f} GFLOP/s")
    print("| model | width | batch | train img/s | data img/s | data share | MFLOP/train img "
          "| GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for spec in a.models:
        name, _, width = spec.partition(":")
        for batch in a.batch_sizes:
            r = bench_model(name, width or None, batch, a.steps, runtime, images, labels)
            r["peak_gflops"] = peak
            rows.append(r)
            print(f"| {r['model']} | {r['width']} | {batch} | {r['train_img_s']:.0f} | "
                  f"{r['data_img_s']:.0f} | {r['data_share'] * 100:.1f}% | "
                  f"{r['mflops_per_train_img']:.1f} | {r['achieved_gflops']:.0f} | "
                  f"{r['achieved_gflops'] / peak * 100:.0f}% |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

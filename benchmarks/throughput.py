"""Training throughput per model on synthetic 32×32 images (compute does not depend on
content): images/s of cnnkit's whole training step (engine.train_step), FLOPs per training
image (torch.utils.flop_counter), achieved GFLOP/s against this machine's matrix-product
peak (in the training dtype) measured in the same run, and what airbench94's schedule
(9.9 epochs of 50,000 images) would take at that rate. `airbench94` times the reference
written out in benchmarks/airbench94.py beside cnnkit's models.

    python benchmarks/throughput.py [--device cpu|cuda] [--models fastnet airbench94 ...]
        [--batch-sizes 128 256 512] [--steps 10] [--threads 2] [--compile] [--json FILE]

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

from cnnkit.config import parse_widths
from cnnkit.device import select_runtime
from cnnkit.engine import TrainStep, train_step
from cnnkit.recipes import fill_recipe_defaults, make_config
from cnnkit.models import create_model
from cnnkit.optim import build_optimizer, build_scheduler
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


def bench_model(name, width, batch, steps, runtime, images, labels, compile=False):
    """images/s of cnnkit's own training step (engine.train_step: augmentation, autocast,
    loss, backward, optimizer and schedule), as `cnnkit train` runs it."""
    cfg = fill_recipe_defaults(make_config(model=name, width=width, batch_size=batch),
                               len(images), runtime.device.type)
    model = create_model(name, num_classes=10, **({"widths": parse_widths(cfg.width)}
                                                  if cfg.width else {}))
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    optimizer = build_optimizer(model, cfg)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    s = TrainStep(optimizer, build_scheduler(optimizer, cfg, 10 ** 6),
                  Augment(cfg.flip, cfg.translate, cfg.cutout), mean, std, runtime,
                  cfg.label_smoothing, scaler=runtime.grad_scaler())
    net = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(0)
    n, state = len(images), {"i": 0}

    def step():
        i = state["i"] = (state["i"] + batch) % (n - batch)
        idx = torch.arange(i, i + batch, device=runtime.device)
        train_step(net, s, idx, idx, images[idx], labels[idx], epoch=1, generator=g)

    x = to_input(images[:1], mean, std)
    flops = train_flops(model, x, labels[:1])  # per image: forward + backward
    return _timed(step, batch, steps, runtime, flops,
                  {"model": name + (" (compiled)" if compile else ""),
                   "width": cfg.width or "default", "batch": batch})


def bench_airbench94(batch, steps, runtime, images, labels, compile=False):
    """The same for the airbench94 reference (benchmarks/airbench94.py): its network and
    step as published (summed loss, triangular schedule, lookahead every 5 steps)."""
    from airbench94 import HYP, Airbench94Net, Lookahead, make_optimizer, triangle
    model = Airbench94Net().to(runtime.device, memory_format=runtime.memory_format)
    hyp = dict(HYP, batch_size=batch)
    optimizer = make_optimizer(model, hyp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: triangle(k, 10 ** 6))
    lookahead = Lookahead(model)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    augment = Augment(hyp["flip"], hyp["translate"], 0)
    g = torch.Generator(device=runtime.device).manual_seed(0)
    net = torch.compile(model) if compile else model
    n, state = len(images), {"i": 0, "k": 0}

    def step():
        i = state["i"] = (state["i"] + batch) % (n - batch)
        idx = torch.arange(i, i + batch, device=runtime.device)
        x = augment(to_input(images[idx], mean, std), idx, 1, g)
        x = x.contiguous(memory_format=runtime.memory_format)
        with torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.autocast):
            loss = F.cross_entropy(net(x).float(), labels[idx],
                                   label_smoothing=hyp["label_smoothing"], reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["k"] += 1
        if state["k"] % hyp["lookahead_every"] == 0:
            lookahead.update(model, hyp["lookahead_decay"] * 0.5 ** 3)  # mid-run pull
    x = to_input(images[:1], mean, std)
    flops = train_flops(model, x, labels[:1])
    return _timed(step, batch, steps, runtime, flops,
                  {"model": "airbench94" + (" (compiled)" if compile else ""),
                   "width": "64,256,256", "batch": batch})


def _timed(step, batch, steps, runtime, flops, row) -> dict:
    measure = timer(runtime)
    measure(step, 3)  # warm-up (and, compiled, the compilation)
    step_s = measure(step, steps) / steps
    return {**row, "train_img_s": batch / step_s, "mflops_per_train_img": flops / 1e6,
            "achieved_gflops": flops * batch / step_s / 1e9}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="+", default=["fastnet:32,128,128", "fastnet", "resnet9",
                                                   "resnet18", "seed-cnn", "seed-simple"],
                   help="NAME or NAME:WIDTHS of registered models, or airbench94 (the "
                   "reference, benchmarks/airbench94.py)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--compile", action="store_true", help="also time each torch.compile'd")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runtime = select_runtime(a.device)
    images = torch.randint(0, 256, (a.images, 3, 32, 32), dtype=torch.uint8, device=runtime.device)
    labels = torch.randint(0, 10, (a.images,), device=runtime.device)
    peak = matmul_peak(runtime)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{runtime.device}{f' ({torch.cuda.get_device_name(runtime.device)})' if runtime.device.type == 'cuda' else ''}, "
          f"{runtime.dtype}, {a.threads} threads; matmul peak {peak:.0f} GFLOP/s")
    print("| model | width | batch | train img/s | s for 9.9 epochs of 50,000 | MFLOP/train img "
          "| GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for spec in a.models:
        name, _, width = spec.partition(":")
        for batch in a.batch_sizes:
            for compiled in ([False, True] if a.compile else [False]):
                r = bench_airbench94(batch, a.steps, runtime, images, labels, compiled) \
                    if name == "airbench94" else \
                    bench_model(name, width or None, batch, a.steps, runtime, images, labels,
                                compiled)
                # airbench94's schedule (9.9 epochs of CIFAR-10's 50,000 images) at this rate
                r.update(peak_gflops=peak, airbench_schedule_s=9.9 * 50_000 / r["train_img_s"],
                         device=str(runtime.device), dtype=str(runtime.dtype))
                rows.append(r)
                print(f"| {r['model']} | {r['width']} | {batch} | {r['train_img_s']:.0f} | "
                      f"{r['airbench_schedule_s']:.2f} | {r['mflops_per_train_img']:.1f} | "
                      f"{r['achieved_gflops']:.0f} | {r['achieved_gflops'] / peak * 100:.0f}% |",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Load on `cnnkit serve` from 127.0.0.1: N requests (one PNG each) at a fixed concurrency;
requests/s, p50/p99 latency and errors. The server runs in its own process.

    python benchmarks/load.py RUN [--requests 2000] [--concurrency 16]
        [--image ../shared/data/cifar10-png-sample/cat/10.png]
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


async def load(url: str, image: bytes, requests: int, concurrency: int):
    latencies, errors = [], 0
    queue = iter(range(requests))
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker():
            nonlocal errors
            for _ in queue:
                start = time.perf_counter()
                r = await client.post(url, files=[("files", ("img.png", image))])
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, errors


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image", default=str(HERE.parent.parent / "shared" / "data" /
                                          "cifar10-png-sample" / "cat" / "10.png"))
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", a.run, "--port",
                               str(port)], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        image = Path(a.image).read_bytes()
        asyncio.run(load(base + "/predict", image, 50, a.concurrency))  # warm-up
        seconds, lat, errors = asyncio.run(load(base + "/predict", image, a.requests,
                                                a.concurrency))
    finally:
        server.terminate()
        server.wait()
    lat.sort()
    print("| requests | concurrency | requests/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.requests} | {a.concurrency} | {a.requests / seconds:.0f} | "
          f"{statistics.median(lat) * 1000:.1f} | {lat[int(len(lat) * 0.99) - 1] * 1000:.1f} | "
          f"{errors} |")


if __name__ == "__main__":
    main()

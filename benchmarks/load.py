"""Load on `cnnkit serve` from 127.0.0.1: requests (one PNG each) at fixed concurrencies;
requests/s, p50/p99 latency and errors, with the server in its own process.

    python benchmarks/load.py RUN [--requests 2000] [--concurrency 16 1] [--rounds 2]
        [--baseline OLD_SRC] [--soak 20000] [--image PNG]

`--baseline OLD_SRC` serves the same run from another checkout's `src` (e.g. a `git
worktree` of an older commit) with uvicorn's pure-Python event loop and HTTP parser, as an
install of that commit had them, and alternates it with this checkout, round by round.
`--profile` samples each server with py-spy (`pip install py-spy`) during its first
concurrency and prints the functions it spent the most time in.
`--soak N` sends N requests to this checkout's server and reports its resident memory
after the warm-up and at the end, then stops it with SIGTERM while requests are in flight.

The client is a few lines of asyncio over keep-alive sockets sending one prepared request,
so that it takes as little as possible of the 2 cores the server shares with it.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

NEW = "from cnnkit.serve import serve; serve({run!r}, port={port})"
OLD = ("import uvicorn; from cnnkit.serve import create_app; "
       "uvicorn.run(create_app({run!r}), port={port}, log_level='warning', loop='asyncio', "
       "http='h11')")
PLAIN = OLD  # this checkout's app with the pure-Python loop: what uvloop/httptools bring


def request_bytes(port: int, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"img.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def one(reader, writer, request: bytes) -> int:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, request: bytes, requests: int, concurrency: int):
    latencies, errors = [], 0
    todo = iter(range(requests))

    async def worker():
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in todo:
            start = time.perf_counter()
            try:
                errors += await one(reader, writer, request) != 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append(time.perf_counter() - start)
        writer.close()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, sorted(latencies), errors


def start_server(code: str, src: Path, run: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, "-c", code.format(run=run, port=port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
    raise SystemExit("server did not start in 60 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def row(name, requests, concurrency, seconds, lat, errors) -> dict:
    return {"server": name, "requests": requests, "concurrency": concurrency,
            "requests_per_s": round(requests / seconds, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1), "errors": errors}


GENERIC = ("threading.py", "thread.py", "runners.py", "base_events.py", "events.py",
           "_contextlib.py", "module.py", "container.py", "_compat.py", "server.py",
           "__main__.py", "<frozen runpy>", "<string>", "main.py")


def top_functions(raw: str, n: int = 14) -> list[tuple[float, str]]:
    """py-spy's raw samples as (share of samples, function) for the functions on the most
    stacks (inclusive time); idle threads and the frames every stack has left out."""
    counts, total = {}, 0
    for line in raw.splitlines():
        stack, _, k = line.rpartition(" ")
        frames = stack.split(";")
        if not k.isdigit() or any(w in frames[-1] for w in ("wait", "select", "_worker")):
            continue
        total += int(k)
        names = set()
        for f in frames:
            name, _, where = f.partition(" (")
            where = where.split(":")[0].rsplit("/", 1)[-1]
            if where and where not in GENERIC:
                names.add(f"{name} ({where})")
        for name in names:
            counts[name] = counts.get(name, 0) + int(k)
    return sorted(((v / max(total, 1), k) for k, v in counts.items()), reverse=True)[:n]


def measure(name, code, src, a, image) -> list[dict]:
    proc, port = start_server(code, src, a.run)
    request = request_bytes(port, image)
    try:
        asyncio.run(load(port, request, 200, 16))  # warm-up
        gc.collect()
        gc.freeze()
        rows = []
        for i, c in enumerate(a.concurrency):
            n = a.requests if c > 1 else max(a.requests // 4, 100)
            spy = None
            if a.profile and i == 0:
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate",
                                        "200", "--format", "raw", "--output", "/dev/stdout",
                                        "--nonblocking"], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
                time.sleep(1)
            rows.append(row(name, n, c, *asyncio.run(load(port, request, n, c))))
            if spy:
                spy.send_signal(signal.SIGINT)
                rows[-1]["profile"] = [f"{share:.0%} {fn}" for share, fn in
                                       top_functions(spy.communicate()[0])]
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait()


def soak(a, image) -> dict:
    proc, port = start_server(NEW, SRC, a.run)
    request = request_bytes(port, image)
    asyncio.run(load(port, request, 1000, 16))  # warm-up
    before = rss_mb(proc.pid)
    result = row("soak", a.soak, 16, *asyncio.run(load(port, request, a.soak, 16)))
    result.update(rss_after_warmup_mb=round(before, 1), rss_end_mb=round(rss_mb(proc.pid), 1))

    async def stop_in_flight():
        # 16 requests in flight when SIGTERM arrives: each must still get its answer
        tasks = [asyncio.create_task(load(port, request, 1, 1)) for _ in range(16)]
        await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        return [await t for t in tasks]
    answered = asyncio.run(stop_in_flight())
    result["sigterm_in_flight_errors"] = sum(e for _, _, e in answered)
    result["sigterm_exit_status"] = proc.wait(timeout=60)
    print(json.dumps(result), flush=True)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline", metavar="OLD_SRC", help="another checkout's src folder")
    p.add_argument("--soak", type=int, metavar="N", help="N requests, memory and SIGTERM")
    p.add_argument("--profile", action="store_true", help="sample the servers with py-spy")
    p.add_argument("--image", default=str(HERE.parent.parent / "shared" / "data" /
                                          "cifar10-png-sample" / "cat" / "10.png"))
    p.add_argument("--json", metavar="FILE", help="also write the rows here")
    a = p.parse_args()
    image = Path(a.image).read_bytes()
    rows = []
    if a.soak:
        rows.append(soak(a, image))
    else:
        for _ in range(a.rounds):
            if a.baseline:
                rows += measure("baseline", OLD, Path(a.baseline), a, image)
                rows += measure("this checkout, asyncio + h11", PLAIN, SRC, a, image)
            rows += measure("this checkout", NEW, SRC, a, image)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

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
`--overload` runs each `--concurrency` (e.g. 16 256 1024) for `--seconds`, each client
sending its next request as soon as it has an answer (a 503 included, as wrk does), and
reports the answered requests' (200) rate and latency, the 503s, any other failure, and the
server's largest resident memory.
`--slow N` measures 16 clients' requests/s alone and beside N connections that send their
body a byte a second (round by round, `--rounds`), and when the server closed each of those.

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
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

NEW = "from cnnkit.serve import serve; serve({run!r}, port={port}, **{serve_args!r})"
OLD = ("import uvicorn; from cnnkit.serve import create_app; "
       "uvicorn.run(create_app({run!r}), port={port}, log_level='warning', loop='asyncio', "
       "http='h11')")
PLAIN = OLD  # this checkout's app with the pure-Python loop: what uvloop/httptools bring
SERVE_ARGS: dict = {}  # --max-queue, --request-timeout, --reject-delay


def request_bytes(port: int, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"img.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def one(reader, writer, request: bytes, headers: dict | None = None) -> int:
    """Sends `request`, reads the answer; its status, and its headers into `headers`."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        if headers is not None:
            headers[name] = value.strip()
    await reader.readexactly(length)
    return status


async def overload(port: int, request: bytes, seconds: float, concurrency: int,
                   patient: bool = False):
    """Answered (200) latencies, statuses and failures from `concurrency` clients that
    send as fast as they are answered, for `seconds`; `patient` ones wait the seconds that a
    503's Retry-After asks for (as urllib3's Retry does), the others retry at once (wrk)."""
    latencies, statuses, failures = [], {}, 0
    end = time.perf_counter() + seconds

    async def worker():
        nonlocal failures
        reader = writer = None
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                status = await one(reader, writer, request, headers := {})
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                failures += 1
                writer = None
                await asyncio.sleep(0.01)
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - start)
            elif status == 503 and patient:
                await asyncio.sleep(min(float(headers[b"retry-after"]),
                                        max(end - time.perf_counter(), 0)))
        if writer is not None:
            writer.close()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, sorted(latencies), statuses, failures


async def slow_body(port: int, request: bytes, seconds: float) -> float | None:
    """A client that sends the headers, then the body a byte a second; the seconds until
    the server closed the connection (None if it had not in `seconds`)."""
    head, _, body = request.partition(b"\r\n\r\n")
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"\r\n\r\n")

    async def trickle():
        for byte in body:
            await asyncio.sleep(1)
            writer.write(bytes([byte]))
            await writer.drain()
    sender = asyncio.create_task(trickle())
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass  # a 408, then the end of the connection
        return time.perf_counter() - start
    except (OSError, asyncio.TimeoutError):
        return None if time.perf_counter() - start >= seconds else \
            time.perf_counter() - start
    finally:
        sender.cancel()
        writer.close()


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
    code = code.format(run=run, port=port, serve_args=SERVE_ARGS)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
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


class PeakMemory:
    """The largest resident memory of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.peak, 1)


def overloaded(a, image) -> list[dict]:
    proc, port = start_server(NEW, SRC, a.run)
    request = request_bytes(port, image)
    try:
        asyncio.run(load(port, request, 1000, 16))  # warm-up
        rows = []
        for clients, c in [(k, c) for k in a.clients for c in a.concurrency]:
            memory = PeakMemory(proc.pid)
            seconds, lat, statuses, failures = asyncio.run(overload(
                port, request, a.seconds, c, patient=clients == "patient"))
            answered = statuses.get(200, 0)
            rows.append({"clients": clients, "concurrency": c, "seconds": round(seconds, 1),
                         "answered": answered, "answered_per_s": round(answered / seconds, 1),
                         "p50_ms": round(statistics.median(lat) * 1000, 1),
                         "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
                         "busy_503": statuses.get(503, 0),
                         "other_statuses": {k: v for k, v in statuses.items()
                                            if k not in (200, 503)},
                         "failed": failures, "peak_rss_mb": memory.close()})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait()


def slow(a, image) -> list[dict]:
    proc, port = start_server(NEW, SRC, a.run)
    request = request_bytes(port, image)

    async def side_by_side(slow_clients: int):
        slows = [asyncio.create_task(slow_body(port, request, 120))
                 for _ in range(slow_clients)]
        await asyncio.sleep(1 if slow_clients else 0)  # all of them connected and sending
        n_seconds, _, statuses, failures = await overload(port, request, a.seconds, 16)
        closed = [await t for t in slows]
        return n_seconds, statuses, failures, closed
    try:
        asyncio.run(load(port, request, 1000, 16))  # warm-up
        rows = []
        for _ in range(a.rounds):
            for n in (0, a.slow):
                seconds, statuses, failures, closed = asyncio.run(side_by_side(n))
                shut = [c for c in closed if c is not None]
                rows.append({"slow_clients": n, "normal_clients": 16,
                             "answered_per_s": round(statuses.get(200, 0) / seconds, 1),
                             "other_statuses": {k: v for k, v in statuses.items() if k != 200},
                             "failed": failures, "slow_closed": len(shut),
                             "slow_closed_after_s": [round(min(shut), 1), round(max(shut), 1)]
                             if shut else None})
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
    p.add_argument("--overload", action="store_true", help="answered, 503 and memory at "
                   "each --concurrency for --seconds")
    p.add_argument("--slow", type=int, metavar="N", help="16 clients beside N slow bodies")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", nargs="+", choices=["patient", "impatient"],
                   default=["patient", "impatient"], help="--overload's clients: those that "
                   "wait Retry-After's second after a 503, and those that retry at once")
    p.add_argument("--max-queue", type=int, help="the server's --max-queue")
    p.add_argument("--request-timeout", type=float, help="the server's --request-timeout")
    p.add_argument("--reject-delay", type=float, help="the server's --reject-delay")
    p.add_argument("--image", default=str(HERE.parent.parent / "shared" / "data" /
                                          "cifar10-png-sample" / "cat" / "10.png"))
    p.add_argument("--json", metavar="FILE", help="also write the rows here")
    a = p.parse_args()
    SERVE_ARGS.update({k: v for k, v in (("max_queue", a.max_queue),
                                         ("request_timeout", a.request_timeout),
                                         ("reject_delay", a.reject_delay)) if v is not None})
    image = Path(a.image).read_bytes()
    rows = []
    if a.soak:
        rows.append(soak(a, image))
    elif a.overload:
        rows += overloaded(a, image)
    elif a.slow:
        rows += slow(a, image)
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

"""torchrun restarts, N times over: `torchrun --standalone --nproc-per-node 2
--max-restarts 1` trains digits, one worker is killed (SIGKILL) once epoch 1 has begun,
and the restarted workers are expected to resume the run from its last saved epoch and
finish it. Counts the runs that finished with every epoch once in metrics.csv, and keeps
the output of the others (a restart that hangs ends at --dist-timeout).

    python benchmarks/elastic.py [--runs 10] [--dist-timeout 30] [--logs DIR]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def workers(agent: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    return [int(c) for c in children if b"cnnkit" in Path(f"/proc/{c}/cmdline").read_bytes()]


def one(run: Path, dist_timeout: int) -> tuple[bool, str]:
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "--max-restarts", "1", "-m", "cnnkit", "train", "--data", "digits", "--model",
         "seed-simple", "--image-size", "32", "--epochs", "6", "--batch-size", "32", "--lr",
         "0.05", "--optimizer", "sgd", "--device", "cpu", "--dist-timeout",
         str(dist_timeout), "--out", str(run)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    seen = []
    for line in agent.stdout:  # epoch 0 is saved; epoch 1 has begun
        seen.append(line)
        if line.split()[:1] == ["1/6"]:
            break
    time.sleep(0.3)
    os.kill(workers(agent)[1], signal.SIGKILL)
    try:
        out, _ = agent.communicate(timeout=4 * dist_timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        out, _ = agent.communicate()
    metrics = run / "metrics.csv"
    epochs = [int(l.split(",")[0]) for l in metrics.read_text().splitlines()[1:]] \
        if metrics.exists() else []
    return agent.returncode == 0 and epochs == list(range(6)), "".join(seen) + out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--dist-timeout", type=int, default=30)
    p.add_argument("--logs", default="benchmarks/elastic-failures")
    a = p.parse_args()
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            start = time.monotonic()
            ok, log = one(Path(tmp) / f"run{i}", a.dist_timeout)
            passed += ok
            print(f"run {i}: {'finished' if ok else 'FAILED'} in "
                  f"{time.monotonic() - start:.0f} s", flush=True)
            if not ok:
                Path(a.logs).mkdir(parents=True, exist_ok=True)
                (Path(a.logs) / f"run{i}.log").write_text(log)
    print(f"{passed} of {a.runs} restarted runs finished")


if __name__ == "__main__":
    main()

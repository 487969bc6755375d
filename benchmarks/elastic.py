"""torchrun restarts, N times over: `torchrun --standalone --nproc-per-node 2
--max-restarts 1` trains digits, one worker is killed (SIGKILL) once epoch 1 has begun,
and the restarted workers are expected to resume the run from its last saved epoch and
finish it. Counts the runs that finished with every epoch once in metrics.csv, keeps the
output of the others (a restart that hangs ends at --dist-timeout), and times each restart
(kill to resumed, kill to training again). First, what the agent and its rendezvous add to
a start (one process started directly against under `torchrun --standalone`).

    python benchmarks/elastic.py [--runs 10] [--dist-timeout 30] [--logs DIR]
        [--rendezvous-rounds 3]
    python benchmarks/elastic.py --plain 30      # the issue's plain DDP command, 30 times
"""
from __future__ import annotations

import argparse
import os
import statistics
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
TRAIN = ["--data", "digits", "--model", "seed-simple", "--image-size", "32", "--epochs", "6",
         "--batch-size", "32", "--lr", "0.05", "--optimizer", "sgd", "--device", "cpu"]


def workers(agent: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    return [int(c) for c in children if b"cnnkit" in Path(f"/proc/{c}/cmdline").read_bytes()]


def one(run: Path, dist_timeout: int) -> tuple[bool, str, dict]:
    """One restarted run: (finished with every epoch once, its output, timings in seconds:
    kill → the restarted rank 0's "resuming" line (failure noticed, workers stopped, the
    rendezvous again, Python and torch started), and kill → its "model:" line (the
    process group formed and the data loaded: training again))."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "--max-restarts", "1", "-m", "cnnkit", "train", *TRAIN, "--dist-timeout",
         str(dist_timeout), "--out", str(run)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    seen, timings = [], {}
    for line in agent.stdout:  # epoch 0 is saved; epoch 1 has begun
        seen.append(line)
        if line.split()[:1] == ["1/6"]:
            break
    time.sleep(0.3)
    os.kill(workers(agent)[1], signal.SIGKILL)
    killed = time.monotonic()
    deadline = threading.Timer(4 * dist_timeout + 60, lambda: os.killpg(agent.pid,
                                                                       signal.SIGKILL))
    deadline.start()
    for line in agent.stdout:
        seen.append(line)
        if "resuming" in line and "resumed" not in timings:
            timings["resumed"] = time.monotonic() - killed
        elif line.startswith("model:") and "resumed" in timings and "training" not in timings:
            timings["training"] = time.monotonic() - killed
    agent.wait()
    deadline.cancel()
    metrics = run / "metrics.csv"
    epochs = [int(l.split(",")[0]) for l in metrics.read_text().splitlines()[1:]] \
        if metrics.exists() else []
    return agent.returncode == 0 and epochs == list(range(6)), "".join(seen), timings


def startup(command: list[str]) -> float:
    """Seconds from starting `command` to its "data:" line (the data loaded; under
    torchrun also the agent and the rendezvous), the process then stopped."""
    start = time.monotonic()
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=ENV, start_new_session=True)
    for line in p.stdout:
        if line.startswith("data:"):
            break
    took = time.monotonic() - start
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return took


def rendezvous_cost(rounds: int) -> dict:
    """What torchrun's agent and rendezvous add to a start: one process started directly
    against `torchrun --standalone --nproc-per-node 1`, alternating, medians."""
    with tempfile.TemporaryDirectory() as tmp:
        plain, agent = [], []
        for i in range(rounds):
            plain.append(startup([sys.executable, "-m", "cnnkit", "train", *TRAIN, "--out",
                                  f"{tmp}/plain{i}"]))
            agent.append(startup([sys.executable, "-m", "torch.distributed.run",
                                  "--standalone", "--nproc-per-node", "1", "-m", "cnnkit",
                                  "train", *TRAIN, "--out", f"{tmp}/agent{i}"]))
    return {"direct": statistics.median(plain), "torchrun": statistics.median(agent)}


def plain_loop(runs: int, logs: str) -> None:
    """The issue's flaky command, `runs` times: torchrun --standalone, 2 processes, the
    tutorial recipe for one epoch on the CIFAR subset; the output of failures is kept."""
    subset = Path(__file__).resolve().parents[2] / "shared/data/cifar10-subset/cifar-10-batches-py"
    passed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            start = time.monotonic()
            p = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "cnnkit", "train", "--data", str(subset),
                 "--recipe", "tutorial", "--epochs", "1", "--val-fraction", "0.2", "--seed",
                 "0", "--out", f"{tmp}/run{i}"], capture_output=True, text=True, env=ENV,
                timeout=600)
            passed += p.returncode == 0
            print(f"plain run {i}: exit {p.returncode} in {time.monotonic() - start:.0f} s",
                  flush=True)
            if p.returncode:
                Path(logs).mkdir(parents=True, exist_ok=True)
                (Path(logs) / f"plain{i}.log").write_text(p.stdout + p.stderr)
    print(f"{passed} of {runs} plain runs passed")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--dist-timeout", type=int, default=30)
    p.add_argument("--logs", default="benchmarks/elastic-failures")
    p.add_argument("--rendezvous-rounds", type=int, default=3)
    p.add_argument("--plain", type=int, metavar="N", help="instead: the issue's plain DDP "
                   "command N times")
    a = p.parse_args()
    if a.plain:
        return plain_loop(a.plain, a.logs)
    cost = rendezvous_cost(a.rendezvous_rounds)
    print(f"start to data loaded, median of {a.rendezvous_rounds}: {cost['direct']:.1f} s "
          f"directly, {cost['torchrun']:.1f} s under torchrun --standalone (agent and "
          f"rendezvous: +{cost['torchrun'] - cost['direct']:.1f} s)", flush=True)
    passed, timings = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            start = time.monotonic()
            ok, log, took = one(Path(tmp) / f"run{i}", a.dist_timeout)
            passed += ok
            timings.append(took)
            print(f"run {i}: {'finished' if ok else 'FAILED'} in "
                  f"{time.monotonic() - start:.0f} s; kill to resumed "
                  f"{took.get('resumed', float('nan')):.1f} s, to training again "
                  f"{took.get('training', float('nan')):.1f} s", flush=True)
            if not ok:
                Path(a.logs).mkdir(parents=True, exist_ok=True)
                (Path(a.logs) / f"run{i}.log").write_text(log)
    print(f"{passed} of {a.runs} restarted runs finished")
    done = [t for t in timings if "training" in t]
    if done:
        print(f"restart cost, median of {len(done)}: kill to resumed "
              f"{statistics.median(t['resumed'] for t in done):.1f} s, to training again "
              f"{statistics.median(t['training'] for t in done):.1f} s")


if __name__ == "__main__":
    main()

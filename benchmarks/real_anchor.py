"""The published airbench94_muon.py (KellerJordan/cifar10-airbench), run on the CPU on
cnnkit's dev split, as a whole script, for benchmarks/frontier.py.

Its code is not in this repository and must not be: bring the repository into a scratch
folder outside cnnkit's tree and pass its file,

    git clone https://github.com/KellerJordan/cifar10-airbench /tmp/airbench
    python benchmarks/frontier.py --anchor-script /tmp/airbench/airbench94_muon.py

`cpu_port` makes, at run time and in a temporary folder, the edits that move it to the CPU
and set the points measured; every edit must match the file exactly once, so a changed
upstream file stops the benchmark instead of measuring something else:

- `.cuda()` out, data loaded to the CPU, `.half()` (and Newton-Schulz's bfloat16) to
  float32: this CPU has no native half or bfloat16;
- CUDA events replaced by `time.perf_counter` around the same regions (whitening,
  training, TTA);
- the batch size, the epochs (8 published) and the widths (64/256/256 published) set;
- the `__main__` block: seeded, one run instead of a warm-up and 200 runs (what a user
  running it once waits for), `torch.compile` of the model and of the Newton-Schulz
  iteration kept or not (`compile`).

Its data: the script reads `cifar10/train.pt` and `cifar10/test.pt` (uint8 N×H×W×C images,
labels, classes) from its working folder; `write_split` writes the dev split there.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULT = "REAL-ANCHOR-RESULT "


def _once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"airbench94_muon.py has changed: {old.splitlines()[0]!r} is there "
                         f"{text.count(old)} times, not once; port it again by hand")
    return text.replace(old, new)


def cpu_port(source: str, *, epochs: float, batch_size: int, widths: tuple[int, int, int],
             seed: int, compile: bool = False) -> str:
    s = source
    if not compile:
        s = _once(s, "@torch.compile\ndef zeropower_via_newtonschulz5",
                  "def zeropower_via_newtonschulz5")
    s = _once(s, "X = G.bfloat16()", "X = G.float()")
    s = _once(s, 'map_location=torch.device("cuda")', 'map_location=torch.device("cpu")')
    s = _once(s, "self.images.half() / 255", "self.images.float() / 255")
    s = _once(s, "mod.half()", "mod.float()")
    s = _once(s, "widths = dict(block1=64, block2=256, block3=256)",
              "widths = dict(block1=%d, block2=%d, block3=%d)" % tuple(widths))
    s = _once(s, "    batch_size = 2000\n", f"    batch_size = {batch_size}\n")
    s = _once(s, "total_train_steps = ceil(8 * len(train_loader))",
              f"total_train_steps = ceil({epochs!r} * len(train_loader))")
    timer = re.search(r"    starter = torch\.cuda\.Event.*?starter\.elapsed_time\(ender\)\n",
                      s, re.S)
    if timer is None:
        raise SystemExit("airbench94_muon.py has changed: its CUDA-event timer is not found")
    s = s.replace(timer[0], (
        "    import time\n"
        "    time_seconds = 0.0\n"
        "    started = [0.0]\n"
        "    def start_timer():\n"
        "        started[0] = time.perf_counter()\n"
        "    def stop_timer():\n"
        "        nonlocal time_seconds\n"
        "        time_seconds += time.perf_counter() - started[0]\n"))
    main = s.index('if __name__ == "__main__":')
    s = s[:main] + (
        'if __name__ == "__main__":\n'
        f"    torch.manual_seed({seed})\n"
        "    model = CifarNet().to(memory_format=torch.channels_last)\n"
        + ('    model.compile(mode="max-autotune")\n' if compile else "") +
        "    print_columns(logging_columns_list, is_head=True)\n"
        "    accuracy = main(0, model)\n"
        f"    print({RESULT!r} + str(accuracy))\n")
    return s


def write_split(train, test, classes: list[str], folder: Path) -> None:
    """cnnkit Splits (uint8 N×C×H×W) as the script's cifar10/{train,test}.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        torch.save({"images": split.images.permute(0, 2, 3, 1).contiguous(),
                    "labels": split.labels.clone(), "classes": list(classes)},
                   folder / f"{name}.pt")


def run(script: Path, workdir: Path, *, epochs: float, batch_size: int, widths, seed: int,
        compile: bool = False, threads: int | None = None) -> dict:
    """Runs the ported script in `workdir` (which holds cifar10/) as its own process.
    Returns its accuracy with TTA, its own seconds (whitening + training, and + TTA) and
    the whole script's wall clock, from the process' start to its exit."""
    ported = workdir / "airbench94_muon_cpu.py"
    ported.write_text(cpu_port(script.read_text(), epochs=epochs, batch_size=batch_size,
                               widths=tuple(widths), seed=seed, compile=compile))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, ported.name], cwd=workdir, env=env,
                          capture_output=True, text=True)
    whole = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the anchor failed:\n{done.stderr[-3000:]}")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in done.stdout.splitlines() if line.startswith("|")]
    head, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(head)}
    epochs_rows = [r for r in rows if r[col["epoch"]].isdigit()]
    final = [r for r in rows if r[col["epoch"]] == "eval"][-1]
    accuracy = float(done.stdout.split(RESULT)[-1].split()[0])
    return {"val_acc": accuracy, "train_seconds": float(epochs_rows[-1][col["time_seconds"]]),
            "script_seconds": float(final[col["time_seconds"]]),
            "whole_seconds": whole, "epochs": epochs,
            "val_acc_per_epoch": [float(r[col["val_acc"]]) for r in epochs_rows]}


if __name__ == "__main__":  # one run, for trying the port by hand
    import argparse

    import cnnkit
    p = argparse.ArgumentParser()
    p.add_argument("script", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workdir", type=Path, required=True)
    a = p.parse_args()
    ds = cnnkit.load_dataset(a.data, val_fraction=0.2, seed=a.seed)
    write_split(ds.train, ds.val, ds.classes, a.workdir / "cifar10")
    print(json.dumps(run(a.script, a.workdir, epochs=a.epochs, batch_size=256,
                         widths=(32, 128, 128), seed=a.seed, compile=a.compile)))

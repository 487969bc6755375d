"""The GPU check: everything cnnkit's CUDA path needs checked and measured, in one command
that took 3.5 minutes on one H200 (2026-12-04, benchmarks/RESULTS.md section 19; run it
through benchmarks/gpu_check.sh, which sets up the machine). Each step runs on its own,
with its own time limit, so one failure does not lose the others' results:

  1. tests    pytest -m cuda (tests/test_cuda.py)
  2. speed    benchmarks/throughput.py: the default GPU recipe's training images/s (fastnet
              64/256/256, batch 1024, bf16, channels_last) against the airbench94 reference
              (benchmarks/airbench94.py) on 50,000 synthetic 32×32 images, eager and
              compiled, and the projected time of airbench94's 9.9-epoch schedule
  3. subset   `cnnkit train` with the fast recipe on the real CIFAR-10 subset (4,068 train /
              1,017 val): accuracy and seconds
  4. predict  benchmarks/predict.py with the model on the GPU (step 3's run): `cnnkit
              predict` over 10,000 PNG files with --csv against decoding them alone (the target of Round 2's
              issue "3 of 9", 70% of decode-alone, which the CPU's 2 cores cannot reach)

It writes gpu-check.json (and each step's own files) into --out and prints a table.
`--dry-run` runs the same steps on the CPU at tiny sizes: it is part of `make test`
(tests/test_gpu_check.py), so the script cannot rot while no GPU is lent.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_folder() -> Path | None:
    """The real test data: carried into .gpu/data (a GPU machine has no ../shared), or the
    shared folder beside the checkout."""
    for candidate in (os.environ.get("CNNKIT_SHARED_DATA"), ROOT / ".gpu" / "data",
                      ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar10-subset").is_dir():
            return Path(candidate)
    return None


def run_step(name: str, command: list[str], out: Path, timeout: float, env: dict) -> dict:
    """Run one step, its output kept in out/<name>.log; never raises."""
    start = time.perf_counter()
    log = out / f"{name}.log"
    print(f"== {name}: {' '.join(command)}", flush=True)
    try:
        with open(log, "w") as f:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"status": "ok" if code == 0 else f"failed ({code})", "seconds": round(seconds, 1),
            "log": log.name}


def junit_summary(path: Path) -> dict:
    """Counts and the names of failed tests from pytest's JUnit XML."""
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = int(suite.get("skipped", 0))
    total = int(suite.get("tests", 0))
    return {"tests": total, "passed": total - len(failed) - skipped, "failed": failed,
            "skipped": skipped}


def subset_result(run: Path) -> dict:
    if not (run / "metrics.csv").exists():
        return {}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    config = json.loads((run / "config.json").read_text())
    return {"val_acc": float(rows[-1]["val_acc"]), "epochs": len(rows),
            "train_seconds": sum(float(r["seconds"]) for r in rows),
            "val_seconds": sum(float(r["val_seconds"]) for r in rows),
            "batch_size": config["batch_size"], "width": config["width"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" /
                                                                   "gpu-check"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py, data = sys.executable, data_folder()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    if data is not None:
        env["CNNKIT_SHARED_DATA"] = str(data)
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        env["CNNKIT_TEST_DEVICE"] = "cpu"
    elif not _cuda_available(py, env):
        print("gpu_check: no CUDA GPU here; use --dry-run on the CPU", file=sys.stderr)
        return 2
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "dry_run": a.dry_run, "machine": _machine(py, env), "steps": {}}

    # 1. the CUDA tests
    step = run_step("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py",
                              "-rA", "-p", "no:cacheprovider",
                              f"--junitxml={out / 'junit.xml'}"],
                    out, 300, env)
    report["steps"]["tests"] = {**step, **junit_summary(out / "junit.xml")}

    # 2. training speed: the default GPU recipe against the airbench94 reference
    sizes = ["--images", "512", "--batch-sizes", "32", "--steps", "2"] if a.dry_run else \
        ["--images", "50000", "--batch-sizes", "1024", "--steps", "50", "--compile"]
    step = run_step("speed", [py, "benchmarks/throughput.py", "--device", device, "--models",
                              "fastnet", "airbench94", *sizes, "--json",
                              str(out / "throughput.json")], out, 240, env)
    rows = json.loads((out / "throughput.json").read_text()) \
        if (out / "throughput.json").exists() else []
    report["steps"]["speed"] = {**step, "rows": rows}

    # 3. the fast recipe on the real CIFAR-10 subset
    run, n = out / "subset-run", 2
    while run.exists():  # cnnkit never overwrites a run folder
        run, n = out / f"subset-run-{n}", n + 1
    if data is None:
        report["steps"]["subset"] = {"status": "skipped: no data (copy it with "
                                               "benchmarks/gpu_check.sh --prepare)"}
    else:
        tiny = ["--epochs", "1", "--width", "8,16,16"] if a.dry_run else []
        command = [py, "-m", "cnnkit", "train", "--data",
                   str(data / "cifar10-subset" / "cifar-10-batches-py"), "--val-fraction",
                   "0.2", "--seed", "0", "--device", device, "--no-plots", "--out", str(run),
                   *tiny]
        step = run_step("subset", command, out, 180, env)
        report["steps"]["subset"] = {**step, **subset_result(run)}

    # 4. predict many files with the model on the GPU, against decoding alone
    if data is None:
        report["steps"]["predict"] = {"status": "skipped: no data"}
    else:
        sizes = ["--files", "64", "--rounds", "1", "--epochs", "1", "--width", "8,16,16"] \
            if a.dry_run else ["--files", "10000", "--rounds", "2"]
        if (run / "last.pt").exists():  # the subset's run, trained in step 3
            sizes += ["--run", str(run)]
        step = run_step("predict", [py, "benchmarks/predict.py", "--device", device,
                                    "--no-onnx", *sizes, "--out", str(out / "predict.json")],
                        out, 150, env)
        measured = json.loads((out / "predict.json").read_text()) \
            if (out / "predict.json").exists() else {}
        report["steps"]["predict"] = {**step, "images_per_s": measured.get("images_per_s", {}),
                                      "ratio": measured.get("ratio", {})}

    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    print(summary(report))
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped")
                    for s in report["steps"].values()) else 1


def summary(report: dict) -> str:
    steps = report["steps"]
    lines = [f"# gpu check{' (dry run, CPU)' if report['dry_run'] else ''}: "
             f"{report['machine'].get('device', '?')}, torch {report['machine'].get('torch')}"]
    t = steps["tests"]
    lines.append(f"tests: {t['status']}; {t.get('passed', '?')} passed, "
                 f"{len(t.get('failed', []))} failed, {t.get('skipped', '?')} skipped"
                 + (f": {', '.join(t['failed'])}" if t.get("failed") else ""))
    rows = steps["speed"].get("rows", [])
    # each row against the reference timed the same way (eager or compiled)
    reference = {"(compiled)" in r["model"]: r["train_img_s"]
                 for r in rows if r["model"].startswith("airbench94")}
    lines.append("| model | batch | train img/s | × airbench94 | s for 9.9 epochs of 50,000 |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        ref = reference.get("(compiled)" in r["model"])
        ratio = f"{r['train_img_s'] / ref:.2f}" if ref else "-"
        lines.append(f"| {r['model']} ({r['width']}) | {r['batch']} | {r['train_img_s']:.0f} | "
                     f"{ratio} | {r['airbench_schedule_s']:.2f} |")
    s = steps.get("subset", {})
    lines.append(f"subset: {s.get('status')}" + (
        f"; val acc {s['val_acc']:.4f} after {s['epochs']} epochs, {s['train_seconds']:.1f} s "
        f"training + {s['val_seconds']:.1f} s evaluation (batch {s['batch_size']}, width "
        f"{s['width']})" if "val_acc" in s else ""))
    s = steps.get("predict", {})
    lines.append(f"predict: {s.get('status')}" + "".join(
        f"; {name} {rate:.0f} images/s ({s['ratio'][name]:.2f} of decode alone)"
        for name, rate in s.get("images_per_s", {}).items()))
    return "\n".join(lines)


def _cuda_available(py: str, env: dict) -> bool:
    probe = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, env=env)
    return probe.stdout.strip() == "True"


def _machine(py: str, env: dict) -> dict:
    probe = subprocess.run([py, "-c", (
        "import json, torch; print(json.dumps({'torch': torch.__version__, 'device': "
        "torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', "
        "'cuda': torch.version.cuda}))")], capture_output=True, text=True, env=env)
    try:
        info = json.loads(probe.stdout)
    except ValueError:
        info = {}
    return {**info, "python": platform.python_version(), "host": platform.node()}


if __name__ == "__main__":
    sys.exit(main())

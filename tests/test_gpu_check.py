"""The GPU check (benchmarks/gpu_check.sh) in its CPU dry run: the same steps at tiny sizes,
so the script is known to work on the day a GPU is lent."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step(tmp_path, cifar_subset):
    env = {**os.environ, "CNNKIT_SHARED_DATA": str(cifar_subset.parents[1])}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] and set(steps) == {"tests", "speed", "subset", "predict"}
    # the CUDA tests ran on the CPU (only what a GPU alone has was skipped), and passed
    assert steps["tests"]["status"] == "ok" and not steps["tests"]["failed"]
    assert steps["tests"]["passed"] >= 13 and steps["tests"]["skipped"] <= 3
    models = [r["model"] for r in steps["speed"]["rows"]]
    assert models == ["fastnet", "airbench94"]
    assert all(r["train_img_s"] > 0 and r["airbench_schedule_s"] > 0
               for r in steps["speed"]["rows"])
    assert steps["subset"]["status"] == "ok" and 0 < steps["subset"]["val_acc"] <= 1
    # predict over files against decoding them alone, and the pipeline with a free model
    assert steps["predict"]["status"] == "ok"
    rates = steps["predict"]["images_per_s"]
    assert {"decode alone", "predict run (PyTorch) --csv", "model alone: run (PyTorch)",
            "predict a model that costs nothing --csv"} <= set(rates)
    assert all(v > 0 for v in rates.values())
    assert "× airbench94" in p.stdout and "subset: ok; val acc" in p.stdout
    assert "predict: ok; decode alone" in p.stdout

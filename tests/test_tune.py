"""cnnkit tune: Optuna studies whose trials are real run folders, on digits (tiny fastnet,
three epochs: a trial takes seconds)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

import cnnkit
from cnnkit.cli import main
from cnnkit.config import settings_from_file
from cnnkit.recipes import fill_recipe_defaults
from cnnkit.tune import default_space

TINY = ["--data", "digits", "--optimizer", "sgd", "--epochs", "3", "--width", "8,16,16",
        "--no-plots"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnkit", "tune", *TINY, *args]


def env() -> dict:
    return {**os.environ, "CNNKIT_PROGRESS": "0"}


def _as_at_a_terminal():
    # A process started where SIGINT is ignored (pytest-xdist's workers, some CI runners)
    # inherits that, and Python then never turns Ctrl-C into KeyboardInterrupt; the user at
    # a terminal this test stands for has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_tiny_study_prunes_and_writes_run_folders_and_the_best_settings(tmp_path):
    lines = []
    # Trial 0 is the defaults (SGD's lr 0.2 at this batch); the sampler is seeded. A trial at
    # lr 1e-6 cannot learn (10 classes: about 10%) and falls below the median of the others
    # at the first third of its schedule, where pruning may start.
    result = cnnkit.tune(3, out=tmp_path / "t", space={"lr": [1e-6, 0.2]}, prune_after=1,
                         data="digits", optimizer="sgd", epochs=3, width="8,16,16", seed=0,
                         plots=False, log=lines.append, progress=False)
    lrs = [r["lr"] for r in result.trials]
    states = [r["state"] for r in result.trials]
    assert lrs == [0.2, 0.2, 1e-6] and states == ["complete", "complete", "pruned"]
    for number in (0, 2):
        run = tmp_path / "t" / "trials" / f"trial-{number}"
        note = json.loads((run / "tune.json").read_text())
        assert note["state"] == states[number] and note["trial"] == number
        epochs = len((run / "metrics.csv").read_text().strip().splitlines()) - 1
        assert epochs == (1 if number == 2 else 3)  # pruned after its first epoch
    # trial 1 drew trial 0's settings again: answered from it, not run a second time
    assert not (tmp_path / "t" / "trials" / "trial-1").exists()
    assert result.trials[1]["val_acc"] == result.trials[0]["val_acc"]
    assert result.trials[1]["run"] == result.trials[0]["run"]
    assert lines[1].startswith("trial 0 (the defaults): val_acc")
    assert lines[2].startswith("trial 1: the settings of trial 0: val_acc")
    assert result.best_params == {"lr": 0.2} and result.best_run.name == "trial-0"
    # each trial is scored on a fifth of the training split, never on digits' test split
    train = len(cnnkit.load_dataset("digits").train)
    assert f"({math.ceil(0.2 * train)}), held out" in lines[0]  # scikit-learn rounds up
    best = settings_from_file(str(result.best_config))
    cfg = cnnkit.make_config(**best)
    assert (cfg.lr, cfg.epochs, cfg.optimizer, cfg.data) == (0.2, 3, "sgd", "digits")
    assert len((tmp_path / "t" / "trials.csv").read_text().strip().splitlines()) == 4
    assert (tmp_path / "t" / "history.png").stat().st_size > 1000
    assert any(line.startswith("best: trial") for line in lines)


def test_an_interrupted_tune_goes_on_with_the_same_command(tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {low: 0.05, high: 0.5, log: true}\n")
    command = cli("--trials", "3", "--space", str(tmp_path / "space.yaml"), "--pruner", "none",
                  "--out", str(tmp_path / "t"))
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(), preexec_fn=_as_at_a_terminal)
    trial_1 = tmp_path / "t" / "trials" / "trial-1"
    # Ctrl-C during trial 1: its run folder is made when its training starts. (The 600 s
    # only ends a hung test; nothing here depends on how fast the machine is.)
    give_up = time.monotonic() + 600
    while not trial_1.exists() and first.poll() is None and time.monotonic() < give_up:
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 130, err
    assert "tune interrupted" in err and "run the same command" in err and "Traceback" not in err
    assert json.loads((trial_1 / "tune.json").read_text())["state"] == "interrupted"
    again = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="cnnkit", storage=f"sqlite:///{tmp_path}/t/study.db")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE]
    assert "1 of 3 trials done" in again.stderr + again.stdout
    # the resumed sampler went on from its draws, it did not draw trial 0's lr again
    assert len({t.params["lr"] for t in study.trials}) == 4


def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "space.yaml").write_text("lr: {low: 0.05, high: 0.5, log: true}\n")
    workers = [subprocess.Popen(cli("--trials", "4", "--space", str(tmp_path / "space.yaml"),
                                    "--storage", storage, "--study", "shared", "--pruner", "none",
                                    "--out", str(tmp_path / f"worker-{i}")),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env()) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t.number for t in study.trials if t.state in FINISHED]
    # 4, or 5 when one worker began a trial while the other finished the fourth
    assert 4 <= len(finished) <= 5 and len(study.trials) == len(finished)
    folders = [int(p.name.split("-")[1]) for i in range(2)
               for p in (tmp_path / f"worker-{i}" / "trials").iterdir()]
    assert sorted(folders) == [t.number for t in study.trials]  # each trial once, somewhere
    for i in range(2):  # both workers' trials count in the study
        assert any((tmp_path / f"worker-{i}" / "trials").iterdir())


@pytest.mark.parametrize("space, storage, message", [
    ("colour: [1, 2]\n", None, "unknown parameter 'colour'"),
    ("lr: [0.1]\n", None, "nothing to search"),
    ("lr: {low: -1, high: 0.5}\n", None, "lr = -1: --lr must be positive"),
    ("lr: [0.1, 0.2]\n", "nosuchdb://x", "Optuna cannot open it"),
], ids=["unknown", "nothing", "refused-value", "storage"])
def test_bad_input_is_one_line(tmp_path, capsys, space, storage, message):
    (tmp_path / "space.yaml").write_text(space)
    args = ["tune", *TINY, "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "t")]
    code = main(args + (["--storage", storage] if storage else []))
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_default_space_fits_the_recipe():
    fast = fill_recipe_defaults(cnnkit.make_config(data="digits"), 1437, "cpu", (8, 8))
    space = default_space(fast, 8, None, budget=False)
    assert set(space) == {"lr", "sgd_lr", "label_smoothing", "epochs", "translate", "cutout",
                          "jitter"}
    assert space["lr"]["low"] < fast.lr < space["lr"]["high"]
    assert space["epochs"]["low"] < fast.epochs < space["epochs"]["high"]
    # a time budget fixes the seconds: the widths are searched instead of the epochs
    budget = fill_recipe_defaults(cnnkit.make_config(data="digits", time_budget=20), 1437,
                                  "cpu", (8, 8))
    space = default_space(budget, 8, None, budget=True)
    assert "epochs" not in space and budget.width in space["width"]["choices"]
    # pretrained weights on few photos: a linear probe, whose one setting is its image size
    probe = fill_recipe_defaults(cnnkit.make_config(model="timm:resnet18"), 200, "cpu",
                                 (352, 352), pretrained=True)
    assert default_space(probe, 352, 224, budget=False) == {
        "image_size": {"choices": [224, 288, 352, 448]}}


def test_import_cnnkit_stays_light():
    heavy = ["optuna", "matplotlib", "fastapi", "captum", "onnx", "onnxruntime"]
    code = f"import sys, cnnkit; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

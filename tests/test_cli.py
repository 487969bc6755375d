"""The command line: one end-to-end run in a real subprocess, and every error as one line."""
import csv
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.cli import main


def _cnnkit(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_end_to_end_cli(tmp_path, png_sample, capsys):
    """Training in a real subprocess, as a user types it; the verbs that use its run
    through main() in this process (the same parser and output, without a Python start
    each)."""
    run = tmp_path / "run"
    p = _cnnkit("train", "--data", png_sample, "--recipe", "tutorial", "--model", "seed-simple",
                "--epochs", "2", "--batch-size", "16", "--no-plots", "--out", run)
    assert p.returncode == 0, p.stderr
    rows = [l.split() for l in p.stdout.splitlines() if re.match(r"\s*\d+/\d+ ", l)]
    assert [r[0] for r in rows] == ["1/2", "2/2"]
    assert "it/s" not in p.stderr and "batch/s" not in p.stderr  # no terminal: no bars
    assert {"config.json", "metrics.csv", "last.pt", "best.pt"} <= set(os.listdir(run))

    def cnnkit_(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cnnkit_("eval", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["num_images"] == 40 and len(result["confusion_matrix"]) == 10

    img = sorted(png_sample.rglob("*.png"))[0]
    code, out, err = cnnkit_("predict", run, img, "--json", "--top-k", "2")
    assert code == 0, err
    out = json.loads(out)
    assert out[0]["file"] == str(img) and len(out[0]["predictions"]) == 2
    assert set(out[0]["predictions"][0]) == {"class", "probability"}

    code, out, err = cnnkit_("predict", run, img, tmp_path / "nope.png")
    assert code != 0
    assert err.strip() == f"cnnkit: error: {tmp_path / 'nope.png'}: no such file"
    assert out.startswith(f"{img}: ")

    code, out, err = cnnkit_("show-batch", "--data", png_sample, "--out", tmp_path / "grid.png")
    assert code == 0, err
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 400 and im.size[1] > 400

    code, out, err = cnnkit_("models")
    assert code == 0 and "seed-cnn" in out and "4,210,090" in out


@pytest.fixture
def bad_inputs(tmp_path, png_sample):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "noimg"
    (no_images / "a").mkdir(parents=True)
    (no_images / "b").mkdir()
    Image.new("RGB", (8, 8)).save(no_images / "a" / "x.png")
    corrupt = tmp_path / "corrupt"
    (corrupt / "a").mkdir(parents=True)
    (corrupt / "b").mkdir()
    Image.new("RGB", (8, 8)).save(corrupt / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(corrupt / "b" / "y.png")
    (corrupt / "b" / "bad.png").write_bytes(b"garbage")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    notckpt = tmp_path / "x.pt"
    notckpt.write_bytes(b"not a checkpoint")
    return dict(empty=empty, no_images=no_images, corrupt=corrupt, taken=taken,
                notckpt=notckpt, tmp=tmp_path)


CASES = {
    "unknown model": (["train", "--data", "digits", "--model", "nope"], "seed-cnn"),
    "unknown recipe": (["train", "--data", "digits", "--recipe", "nope"], "tutorial"),
    "unknown data": (["train", "--data", "./no/such/folder"], "cifar10"),
    "empty folder": (["train", "--data", "{empty}"], "no class subfolders"),
    "class without images": (["train", "--data", "{no_images}"], "no images"),
    "strict corrupt": (["train", "--data", "{corrupt}", "--strict"], "bad.png"),
    "out exists": (["train", "--data", "digits", "--out", "{taken}"], "never overwrites"),
    "offline download": (["train", "--data", "mnist", "--data-dir", "{tmp}/cache"],
                         "--data PATH"),
    "bad val fraction": (["train", "--data", "digits", "--val-fraction", "1.5"],
                         "between 0 and 1"),
    "no gpu": (["train", "--data", "digits", "--device", "cuda"], "no CUDA"),
    "fp16 on the cpu": (["train", "--data", "digits", "--device", "cpu", "--amp", "fp16"],
                        "--amp fp16 is for CUDA GPUs"),
    "eval no run": (["eval", "{tmp}/nothing"], "no checkpoint"),
    "eval not a checkpoint": (["eval", "{notckpt}"], "not a readable checkpoint"),
    "predict no run": (["predict", "{tmp}/nothing", "x.png"], "no checkpoint"),
}


SETTINGS = {
    "model typo": (["--model", "resnt9"], "did you mean resnet9?"),
    "recipe typo": (["--recipe", "fats"], "did you mean fast?"),
    "optimizer typo": (["--optimizer", "adamv"], "did you mean adamw?"),
    "data typo": (["--data", "cifar11"], "did you mean cifar10?"),
    "zero epochs": (["--epochs", "0"], "--epochs must be at least 1"),
    "negative lr": (["--lr", "-1"], "--lr must be positive"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "val fraction 1": (["--val-fraction", "1"], "between 0 and 1"),
    "val fraction 0": (["--val-fraction", "0"], "between 0 and 1"),
    "image too small": (["--model", "seed-simple", "--image-size", "2"], "at least 4×4"),
    "missing weights": (["--weights", "nope.pt"], "no such file"),
    "width on a seed model": (["--model", "seed-cnn", "--width", "8"], "does not apply"),
    "amp typo": (["--amp", "bf61"], "did you mean bf16?"),
    "channels 2": (["--channels", "2"], "--channels"),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_settings_fail_with_status_2_before_data_loads(case, capsys, monkeypatch):
    train_module = importlib.import_module("cnnkit.setup")

    def no_loading(*a, **k):
        raise AssertionError("data was loaded before the settings were checked")
    monkeypatch.setattr(train_module, "load_dataset", no_loading)
    flags, expect = SETTINGS[case]
    argv = ["train"] + (["--data", "digits"] if "--data" not in flags else []) + flags
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err


@pytest.mark.parametrize("case", list(CASES))
def test_errors_are_one_clear_line(case, bad_inputs, capsys, monkeypatch):
    if case == "no gpu" and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, expect = CASES[case]
    argv = [a.format(**bad_inputs) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: "), err
    assert expect in lines[0]
    assert (bad_inputs["taken"] / "keep.txt").read_text() == "mine"


def test_error_in_a_real_process_has_no_traceback():
    p = _cnnkit("train", "--data", "digits", "--model", "nope")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_bad_flag_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2


def test_demo_falls_back_to_digits_offline(tmp_path, capsys):
    code = main(["demo", "--data", "cifar10", "--data-dir", str(tmp_path / "cache"),
                 "--epochs", "1", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0
    assert "could not download cifar10" in out and "digits instead" in out
    assert "data: digits" in out and "confusion matrix" in out
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["data"] == "digits"


def test_patience_stops_a_run_whose_accuracy_is_flat(tmp_path):
    lines = []
    # lr so small that nothing changes: validation accuracy is flat after epoch 0
    result = cnnkit.train(plots=False,
                          data="digits", model="seed-simple", recipe="tutorial", lr=1e-12,
                          epochs=10, patience=2, image_size=8 * 2, out=str(tmp_path / "r"),
                          log=lines.append)
    accs = [m["val_acc"] for m in result.metrics]
    assert len(accs) == 3 and len(set(accs)) == 1, accs
    assert any(l.startswith("stopping early: val accuracy has not improved for 2 epochs")
               and "without --patience" in l for l in lines)
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=True)["epoch"] == 0
    with pytest.raises(cnnkit.CnnkitError, match="--patience must be at least 1"):
        cnnkit.train(plots=False, data="digits", patience=0)


def test_config_of_a_finished_run_repeats_it(png_run, tmp_path, monkeypatch, capsys):
    from cnnkit.checkpoint import RunInfo
    from cnnkit.config import settings_from_file
    saved = png_run.run_dir / "config.json"
    original = RunInfo.from_dict(json.loads(saved.read_text()))
    rebuilt = cnnkit.make_config(**settings_from_file(str(saved)))
    assert rebuilt == dataclasses.replace(original.config, out=None,
                                          data=original.data_source)
    monkeypatch.chdir(tmp_path)  # from anywhere: the data is found by its absolute path
    assert main(["train", "--config", str(saved), "--epochs", "1", "--out", "again"]) == 0
    err = capsys.readouterr().err
    assert f"from {saved}; --epochs, --out from the command line" in err
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["epochs"] == 1 and again["seed"] == original.config.seed
    assert again["model"] == original.config.model and again["lr"] == original.config.lr
    assert again["data_source"] == original.data_source
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2


def test_config_from_a_yaml_file(tmp_path, capsys):
    chosen = tmp_path / "mine.yaml"
    chosen.write_text("# a YAML file of chosen settings\ndata: digits\nepochs: 1\n"
                      "width: 8,16,16\noptimizer: sgd\nlr: 0.05\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(chosen), "--seed", "3", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["data"], saved["epochs"], saved["optimizer"], saved["lr"], saved["seed"]) \
        == ("digits", 1, "sgd", 0.05, 3)
    assert f"settings: 5 from {chosen}" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text("epochs: [1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not a readable YAML file" in capsys.readouterr().err
    code = tmp_path / "code.yaml"  # safe_load: a tag that would build an object is refused
    code.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    assert main(["train", "--config", str(code)]) == 2
    assert "hacked" not in capsys.readouterr().out


def test_epoch_table_has_a_header_and_one_row_per_epoch(tmp_path):
    lines = []
    cnnkit.train(plots=False, data="digits", epochs=3, width="8,16,16", out=str(tmp_path / "r"),
                 log=lines.append)
    header = next(i for i, l in enumerate(lines) if l.split()[:1] == ["epoch"])
    assert lines[header].split() == ["epoch", "train", "loss", "train", "acc", "val", "loss",
                                     "val", "acc", "top-5", "lr", "time", "left"]
    rows = [l.split() for l in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["1/3", "2/3", "3/3"]
    metrics = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    for row, saved in zip(rows, metrics):
        # the table prints what metrics.csv holds, rounded: accuracies to 4 decimals (half a
        # unit: 5e-5) and the lr to 3 significant digits (half a unit: 0.5%)
        train_loss, train_acc, val_loss, val_acc, top5, lr = map(float, row[1:7])
        assert val_acc == pytest.approx(float(saved["val_acc"]), abs=1e-4)
        assert lr == pytest.approx(float(saved["lr"]), rel=1e-2)
        assert val_acc <= top5 <= 1 and top5 == pytest.approx(float(saved["val_top5"]),
                                                               abs=1e-4)
        assert row[7].endswith("s") and row[8].endswith("s")  # seconds, time left
    assert rows[2][8] == "0.0s"  # nothing left after the last epoch
    accs = [float(r[4]) for r in rows]
    best_so_far = [a > max(accs[:i], default=-1) for i, a in enumerate(accs)]
    assert [r[9:10] == ["*"] for r in rows] == best_so_far  # the mark on each new best


def test_amp_bf16_trains_on_the_cpu_and_is_saved_with_the_run(tmp_path):
    """bf16 autocast runs on any CPU (slowly where it is not native); fp16 with its
    GradScaler is checked on CUDA (tests/test_cuda.py)."""
    result = cnnkit.train(plots=False, data="digits", epochs=1, width="8,16,16", amp="bf16",
                          out=str(tmp_path / "r"), log=lambda s: None)
    assert result.config.amp == "bf16" and 0 <= result.best_val_acc <= 1
    assert cnnkit.load(tmp_path / "r").config.amp == "bf16"


def test_train_help_is_grouped_with_choices_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    groups = [l.split(":")[0] for l in text.splitlines()[1:] if re.match(r"[a-z]+: [a-z]", l)
              and not l.startswith("usage")]
    assert groups == ["data", "model", "training", "augmentation", "evaluation", "output",
                      "distributed"]
    assert "--optimizer {sgd,adamw,muon}" in text and "--amp {auto,bf16,fp16,off}" in text
    assert "(default: None)" not in text and "default: the test split" in text
    assert re.search(r"--momentum X +SGD momentum \(default: 0\.85\)", text)
    examples = text.split("examples:")[1].strip().splitlines()
    assert 4 <= len(examples) <= 6 and all(l.strip().startswith("cnnkit ") for l in examples)


def test_each_verb_offers_only_the_flags_that_act_there(capsys):
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = capsys.readouterr().out
    for flag in ("--epochs", "--time-budget", "--sync-bn", "--tensorboard", "--patience"):
        assert flag not in text
    assert "--lr " in text and "--steps N" in text
    with pytest.raises(SystemExit):
        main(["lr-find", "--epochs", "3"])
    assert "unrecognized arguments: --epochs" in capsys.readouterr().err


def test_progress_bars_where_someone_watches(tmp_path, png_run, png_sample, capsys,
                                             monkeypatch):
    """At a terminal (forced here with CNNKIT_PROGRESS=1) training, decoding, evaluation
    and predict draw bars on stderr; without one (CNNKIT_PROGRESS=0) they draw nothing.
    (main() in this process: the bars go to sys.stderr as in a terminal's.)"""
    def cnnkit_(progress, *args):
        monkeypatch.setenv("CNNKIT_PROGRESS", progress)
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out, err
    shown = cnnkit_("1", "predict", png_run.run_dir, png_sample / "cat")
    assert "predicting: " in shown[1] and "/21 " in shown[1]
    hidden = cnnkit_("0", "predict", png_run.run_dir, png_sample / "cat")
    assert hidden[1] == "" and hidden[0] == shown[0]
    _, err = cnnkit_("1", "train", "--data", png_sample, "--epochs", "1", "--width", "8,16,16",
                     "--out", tmp_path / "r")
    for bar in ("decoding cifar10-png-sample", "epoch 1/1", "loss=", "evaluating",
                "drawing the report"):
        assert bar in err, bar

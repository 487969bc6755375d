"""Nothing lost, nothing let in: resume, interrupts, kills, full disks, locked run folders."""
import csv
import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import cnnkit
from cnnkit.errors import CnnkitError, Interrupted

SMALL = dict(data="digits", width="8,16,16", batch_size=64, seed=7, flip="random",
             translate=1)


def _metrics_without_times(run):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _interrupt_after(epoch, epochs):
    def log(line):
        if line.split()[:1] == [f"{epoch + 1}/{epochs}"]:  # its row of the epoch table
            raise KeyboardInterrupt
    return log


@pytest.mark.parametrize("settings", [
    dict(SMALL, epochs=4, ema=0.9),                                        # fastnet + EMA
    dict(SMALL, epochs=3, recipe="tutorial", model="seed-cnn", lr=0.01, width=None),  # dropout
])
def test_interrupted_and_resumed_run_equals_the_run_left_alone(tmp_path, settings):
    whole = cnnkit.train(plots=False, out=str(tmp_path / "whole"), log=lambda s: None, **settings)
    with pytest.raises(Interrupted, match="resume with: cnnkit train --resume"):
        cnnkit.train(plots=False,
                     out=str(tmp_path / "cut"), log=_interrupt_after(1, settings["epochs"]),
                     **settings)
    assert len(_metrics_without_times(tmp_path / "cut")) == 2
    resumed = cnnkit.train(resume=tmp_path / "cut", log=lambda s: None)
    assert resumed.run_dir == tmp_path / "cut"
    assert _metrics_without_times(tmp_path / "cut") == _metrics_without_times(whole.run_dir)
    a = torch.load(whole.run_dir / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in ("state_dict",):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    raw_a, raw_b = a["train_state"]["model"], b["train_state"]["model"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


def test_resume_refuses_new_settings_and_non_runs(tmp_path):
    with pytest.raises(CnnkitError, match="drop --lr"):
        cnnkit.train(resume=tmp_path, lr=0.1)
    with pytest.raises(CnnkitError, match="not a run folder"):
        cnnkit.train(resume=tmp_path)


def _as_at_a_terminal():
    # A job started in the background by a non-interactive shell (some CI runners) inherits
    # SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt; the user
    # at a terminal this test stands for has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "cnnkit", *map(str, args)],
                            preexec_fn=_as_at_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(run, n, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.csv").exists() and \
                len(open(run / "metrics.csv").read().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def test_signal_keeps_the_last_epoch_and_says_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM, each to a run of its own (side by side: most of each
    is starting Python and torch)."""
    runs = {signal.SIGINT: (tmp_path / "int", 130), signal.SIGTERM: (tmp_path / "term", 143)}
    procs = {sig: _spawn("train", "--data", "digits", "--width", "8,16,16", "--epochs",
                         "500", "--out", run) for sig, (run, _) in runs.items()}
    try:
        for sig, (run, code) in runs.items():
            proc = procs[sig]
            _wait_for_rows(run, 2, proc)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == code, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and f"cnnkit train --resume {run}" in lines[0], err
            ckpt = torch.load(run / "last.pt", weights_only=True)
            rows = list(csv.DictReader(open(run / "metrics.csv")))
            assert ckpt["epoch"] == int(rows[-1]["epoch"]) >= 1
            assert cnnkit.load(run / "last.pt").classes == [str(i) for i in range(10)]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    import cnnkit.checkpoint as ck
    real_save = torch.save
    calls = []
    def dying_save(obj, f, *a, **k):
        calls.append(getattr(f, "name", ""))
        if sum("last.pt" in c for c in calls) == 2:   # the second epoch's last.pt
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    ck.torch.save = dying_save
    from cnnkit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_a_checkpoint_write_leaves_a_resumable_run(tmp_path):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", KILLER, "train", "--data", "digits",
                        "--width", "8,16,16", "--epochs", "4", "--out", str(run)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL
    ckpt = torch.load(run / "last.pt", weights_only=True)  # the previous one, whole
    assert ckpt["epoch"] == 0
    text = open(run / "metrics.csv").read()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    result = cnnkit.train(resume=run, log=lambda s: None)
    assert [m["epoch"] for m in result.metrics] == [0, 1, 2, 3]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import cnnkit.checkpoint as ck
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 4:  # after epoch 0 is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(ck.os, "fsync", fsync)
    with pytest.raises(CnnkitError, match="the disk is full"):
        cnnkit.train(plots=False, out=str(tmp_path / "r"), epochs=3, log=lambda s: None, **SMALL)
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 0
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp-" in p]


def test_output_that_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CnnkitError, match="cannot create run folder"):
        cnnkit.train(plots=False, out=str(tmp_path / "file" / "run"), epochs=1, log=lambda s: None,
                     **SMALL)


def test_second_training_on_a_locked_folder_refuses(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training holds it
        with pytest.raises(CnnkitError, match="another cnnkit training is writing"):
            cnnkit.train(plots=False, out=str(out), epochs=1, log=lambda s: None, **SMALL)
    assert os.listdir(out) == [".lock"]


def test_a_diverging_run_stops_naming_epoch_and_step(tmp_path):
    with pytest.raises(CnnkitError, match=r"diverged: loss is (nan|inf) at epoch 0, step \d+"):
        cnnkit.train(plots=False, data="digits", recipe="tutorial", model="seed-simple", lr=1e12,
                     epochs=2, out=str(tmp_path / "r"), log=lambda s: None)


def test_weights_for_another_model_name_both_sides(tmp_path, png_run):
    with pytest.raises(CnnkitError, match=r"holds seed-simple for 10 classes at 3×32×32, "
                                          r"which does not fit seed-cnn for 2 classes"):
        cnnkit.train(plots=False,
                     data=str(_two_classes(tmp_path)), recipe="tutorial", model="seed-cnn",
                     weights=str(png_run.run_dir / "best.pt"), out=str(tmp_path / "r"),
                     val_fraction=0.5, log=lambda s: None)


def _two_classes(tmp_path):
    from PIL import Image
    root = tmp_path / "two"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_safetensors_export_loads_to_identical_logits(tmp_path, png_run, png_sample):
    from cnnkit.cli import main
    out = tmp_path / "model.safetensors"
    assert main(["export", str(png_run.run_dir), "--format", "safetensors", "--out",
                 str(out)]) == 0
    assert main(["export", str(png_run.run_dir), "--out", str(out)]) == 2  # never overwrite
    a, b = cnnkit.load(png_run.run_dir), cnnkit.load(out)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(a.model(x), b.model(x)) and a.classes == b.classes
    img = sorted(png_sample.rglob("*.png"))[:3]
    assert cnnkit.predict(out, img, device="cpu") == [
        {**r, "file": r["file"]} for r in cnnkit.predict(png_run.run_dir, img, device="cpu")]
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CnnkitError, match="not cnnkit's metadata"):
        cnnkit.load(tmp_path / "bare.safetensors")


@pytest.fixture
def sigint_as_at_a_terminal():
    """Ctrl-C as at a terminal, whatever this test process inherited (see _as_at_a_terminal)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_during_epoch_writes_waits_and_a_second_one_stops_at_once(
        sigint_as_at_a_terminal):
    from cnnkit.runs import deferred_interrupts
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the writes finished")  # the first Ctrl-C waited for them
    assert done == ["the writes finished"]
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
            time.sleep(0.05)
            done.append("not reached")
    assert done == ["the writes finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

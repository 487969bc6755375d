"""DDP on the CPU: 2 processes over gloo, started by torchrun or cnnkit's --nproc (torchrun's
own elastic agent), against one process doing the same work."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cnnkit
from cnnkit import distributed
from cnnkit.data import Split
from cnnkit.device import select_runtime
from cnnkit.engine import TrainStep, evaluate_split, train_one_epoch
from cnnkit.models import create_model
from cnnkit.transforms import Augment

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _data(n: int, size: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    images[:, labels.remainder(3), :4, :4] = 255  # something to learn
    return Split(images, labels)


# (global batch, steps): 25 does not split evenly, the processes hold 13 and 12 images
CASES = [(24, 1), (25, 2)]


def _steps(model_name: str) -> list[dict]:
    """For each of CASES, a few optimizer steps from a fixed start, as one process of however
    many run it (one job for all cases): augmentation, label smoothing, class weights and
    momentum all in play."""
    dist = distributed.from_env()
    runtime = select_runtime("cpu")
    results = []
    with distributed.process_group(dist, runtime.device, timeout=600):
        for batch_size, steps in CASES:
            torch.manual_seed(0)
            model = create_model(model_name, num_classes=4, in_channels=3, image_size=(16, 16))
            net = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            step = TrainStep(optimizer, scheduler, Augment("random", 2, 4), [0.5] * 3,
                             [0.25] * 3, runtime, label_smoothing=0.1, dist=dist,
                             class_weights=torch.tensor([1.0, 2.0, 0.5, 1.5]))
            stats = train_one_epoch(net, _data(60), step, batch_size=batch_size, epoch=0,
                                    generator=torch.Generator().manual_seed(3),
                                    max_batches=steps)
            results.append({"state": {k: v.clone() for k, v in model.state_dict().items()},
                            "loss": stats.loss, "acc": stats.accuracy})
    return results


def test_a_ddp_step_with_global_batch_b_equals_one_process_with_batch_b():
    start = create_model("seed-simple", num_classes=4, in_channels=3, image_size=(16, 16))
    for (batch_size, steps), ddp, one in zip(CASES, distributed.launch(2, _steps, "seed-simple"),
                                              _steps("seed-simple")):
        # Another process sums the gradients in another order: equal to float32 rounding
        # of sums over a few thousand terms, on any CPU.
        for name, value in one["state"].items():
            assert torch.allclose(ddp["state"][name], value, atol=2e-5, rtol=1e-4), name
        moved = max((one["state"][k] - v).abs().max() for k, v in start.state_dict().items())
        assert moved > 1e-3  # the steps really changed the weights
        assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert abs(ddp["acc"] - one["acc"]) * batch_size * steps <= 1  # within one image


TTAS = [0, 2]


def _evaluations(state: dict) -> list[tuple]:
    """For each of TTAS, rank 0's result of a distributed evaluation, and its own
    single-process one (one job for all)."""
    dist = distributed.from_env()
    runtime = select_runtime("cpu")
    results = []
    with distributed.process_group(dist, runtime.device, timeout=600):
        model = _eval_model(state)
        for tta in TTAS:
            kw = dict(mean=[0.5] * 3, std=[0.25] * 3, runtime=runtime, num_classes=4,
                      batch_size=100, tta=tta)
            shared = evaluate_split(model, _data(1037, seed=1), dist=dist, **kw)
            alone = evaluate_split(model, _data(1037, seed=1), **kw) if dist.main else None
            results.append((shared, alone))
    return results


def _eval_model(state):
    model = create_model("fastnet", num_classes=4, in_channels=3, image_size=(16, 16),
                         widths=(8, 16, 16))
    model.load_state_dict(state)
    return model


def test_distributed_evaluation_equals_one_process():
    torch.manual_seed(1)
    model = create_model("fastnet", num_classes=4, in_channels=3, image_size=(16, 16),
                         widths=(8, 16, 16))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        model(torch.randn(64, 3, 16, 16))
    state = model.state_dict()
    for tta, (shared, alone) in zip(TTAS, distributed.launch(2, _evaluations, state)):
        # 1037 images in 11 batches of up to 100: rank 0 computed 6 of them, rank 1 five.
        here = evaluate_split(_eval_model(state), _data(1037, seed=1), mean=[0.5] * 3,
                              std=[0.25] * 3, runtime=select_runtime("cpu"), num_classes=4,
                              batch_size=100, tta=tta)
        # Each batch is computed as one process computes it, but the processes split the
        # CPU's threads, and thread counts change the rounding: equal to float32 rounding
        # (probabilities to 1e-5), and to an image whose top two classes are that close.
        for single in (alone, here):
            assert (shared.confusion - single.confusion).abs().sum() <= 2  # one image moved
            assert shared.accuracy == pytest.approx(single.accuracy, abs=1.5 / 1037)
            assert shared.loss == pytest.approx(single.loss, rel=1e-4)
            assert torch.allclose(shared.probs, single.probs, atol=1e-5, rtol=0)
        assert int(shared.confusion.sum()) == 1037 and shared.probs.shape == (1037, 4)


def _rank1_pid(launcher: subprocess.Popen, run: Path) -> int:
    """The worker process that is not rank 0: rank 0 is the one holding the run folder's lock."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    workers = [int(c) for c in children  # --nproc's spawned workers, or torchrun's
               if any(w in Path(f"/proc/{c}/cmdline").read_bytes()
                      for w in (b"spawn_main", b"cnnkit"))]
    lock = str((run / ".lock").resolve())
    others = [w for w in workers if not any(os.readlink(f) == lock for f in
                                            Path(f"/proc/{w}/fd").iterdir())]
    assert len(workers) == 2 and len(others) == 1, (workers, others)
    return others[0]


def _command(*args, nproc=None) -> list[str]:
    extra = ["--nproc", str(nproc)] if nproc else []
    return [sys.executable, "-m", "cnnkit", "train", "--no-plots", *map(str, args), *extra]


def _train(*args, nproc=None):
    return subprocess.run(_command(*args, nproc=nproc), capture_output=True, text=True,
                          env=ENV, timeout=600)


def _together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent runs side by side (most of a small run is starting Python and torch,
    which two cores do at once), each as subprocess.run would return it."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for c in commands]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(procs, outputs)]


def test_a_killed_rank_ends_the_job_and_resume_takes_any_process_count(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "train", "--no-plots", "--nproc", "2", "--data", "digits",
         "--model", "seed-simple", "--image-size", "16", "--epochs", "5", "--batch-size",
         "32", "--lr", "0.05", "--device", "cpu", "--out", str(run),
         # SGD: Muon's normalized updates magnify 1-vs-2-process rounding past the
         # few-image tolerance below
         "--optimizer", "sgd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV)
    for line in launcher.stdout:  # epoch 0 is saved; epoch 1 has begun
        if line.split()[:1] == ["1/5"]:
            break
    time.sleep(0.3)
    os.kill(_rank1_pid(launcher, run), signal.SIGKILL)
    # The launcher sees its worker die and ends the job (not --dist-timeout's 300 s later:
    # the reason names the signal)
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode != 0
    assert err.strip().splitlines() == [err.strip()], err  # one line, no traceback
    assert "rank 1" in err and "SIGKILL" in err and f"--resume {run}" in err
    saved = len((run / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= saved < 5

    # The same run continues with 1 process, and (a copy of it) with 2. The data stream is
    # the same whatever the number of processes, so (with neither dropout nor BatchNorm,
    # whose randomness and statistics are per process) the first epoch after the resume
    # agrees to rounding; later epochs drift apart as rounding differences grow.
    subprocess.run(["cp", "-r", run, tmp_path / "copy"], check=True)
    one, two = _together(_command("--resume", run),
                         _command("--resume", tmp_path / "copy", nproc=2))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    rows = [[[float(v) for v in line.split(",")]
             for line in (tmp_path / r / "metrics.csv").read_text().splitlines()[1:]]
            for r in ("run", "copy")]
    assert [r[0] for r in rows[0]] == [r[0] for r in rows[1]] == list(range(5))
    # Rounding differs between 1 and 2 processes (and between CPUs): losses agree relatively,
    # accuracies to a few images (1,437 train and 360 validation images).
    first_one, first_two = rows[0][saved], rows[1][saved]
    _, train_loss, train_acc, val_loss, val_acc = first_one[:5]
    assert first_two[1] == pytest.approx(train_loss, rel=1e-2)
    assert abs(first_two[2] - train_acc) * 1437 <= 3
    assert first_two[3] == pytest.approx(val_loss, rel=1e-2)
    assert abs(first_two[4] - val_acc) * 360 <= 3


# The multi-process runs below train with these settings (SGD: Muon's normalized updates
# magnify 1-vs-2-process rounding past the few-image tolerances used here).
JOB = ["--data", "digits", "--model", "seed-simple", "--image-size", "16", "--epochs", "4",
       "--batch-size", "32", "--lr", "0.05", "--optimizer", "sgd", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """JOB as `--nproc 2` runs it, left alone: the run that two agents, and a job restarted
    after a killed rank, must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    p = _train(*JOB, "--out", run, nproc=2)
    assert p.returncode == 0, p.stderr
    return run


def _like_the_reference(run: Path, reference: Path, rows: int | None = None) -> None:
    """The same epochs, losses and accuracies as the reference, to rounding: a job of other
    processes sums in another order, so losses agree relatively and accuracies to a few
    images (1,437 train and 360 validation images)."""
    mine, theirs = _metrics(run), _metrics(reference)[:rows]
    assert [r[0] for r in mine[:len(theirs)]] == [r[0] for r in theirs]
    for a, b in zip(mine, theirs):
        assert a[1] == pytest.approx(b[1], rel=1e-2)  # train loss
        assert abs(a[2] - b[2]) * 1437 <= 3 and abs(a[4] - b[4]) * 360 <= 3  # accuracies


def _agents(run: Path, nnodes: str, *extra: str, conf: str = "",
            dist_timeout: int = 600) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine meeting at a c10d rendezvous, as two machines
    would (127.0.0.1 in place of the first machine's host name); each one's output goes to
    files beside the run (`_output`).

    The first hosts the rendezvous store (is_host=1), as the endpoint's machine would. The
    second starts before it and waits for that store (read_timeout: up to 10 minutes); the
    first starts once the second has logged that its launcher is up (its imports done, the
    store next). So both are ready when the store opens, however slowly Python and torch
    start here, and the second joins round 0 at its next connection retry (seconds: a
    --nnodes MIN:MAX test gives the last call room for that)
    (started the other way round, on a slower machine the second was still importing torch
    when last_call_timeout closed round 0 without it; it then joined round 1 as a new
    machine does, and that scale-up hangs in PyTorch 2.14's agent with its shared store:
    the first, rank 0 of round 0 already, does not publish MASTER_ADDR again for round 1,
    and both time out after 60 s. README: "Machines that join later")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start(host: bool) -> subprocess.Popen:
        name = run.parent / f"agent-{'first' if host else 'second'}"
        rdzv = f"read_timeout=600,is_host={int(host)}" + (f",{conf}" if conf else "")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes,
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                   f"127.0.0.1:{port}", "--rdzv-id", f"cnnkit-test-{port}", "--rdzv-conf",
                   rdzv, *extra, "-m", "cnnkit", "train", "--no-plots", *JOB,
                   "--dist-timeout", str(dist_timeout), "--out", str(run)]
        with open(f"{name}.out", "w") as out, open(f"{name}.err", "w") as err:
            agent = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                     env={**ENV, "LOGLEVEL": "INFO"}, start_new_session=True)
        agent.logs = (Path(f"{name}.out"), Path(f"{name}.err"))
        return agent

    second = start(host=False)
    _wait_for(lambda: "Starting elastic_operator" in second.logs[1].read_text(), second)
    return [start(host=True), second]


def _wait_for(event, *agents: subprocess.Popen) -> None:
    """Until event() holds, while every agent runs; 10 minutes at most (a machine 5x slower
    than this one needs a minute)."""
    deadline = time.monotonic() + 10 * 60
    while not event():
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), \
            "\n\n".join(_output(a) for a in agents)
        time.sleep(0.1)


def _output(agent: subprocess.Popen) -> str:
    out, err = (f.read_text(errors="replace") for f in agent.logs)
    return f"agent {agent.args[agent.args.index('--rdzv-conf') + 1]} exited " \
        f"{agent.poll()}:\n{out[-2000:]}\n{err[-4000:]}"


def _finish(agents: list[subprocess.Popen]) -> list[str]:
    """Each agent's exit status (after waiting up to 10 minutes) and stdout; any left
    running is killed."""
    try:
        for a in agents:
            a.wait(timeout=600)
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    return [a.logs[0].read_text() for a in agents]


def _metrics(run: Path) -> list[list[float]]:
    return [[float(v) for v in line.split(",")]
            for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def _final_state(run: Path) -> dict:
    return cnnkit.load(run / "last.pt").model.state_dict()


def test_a_rank_killed_under_max_restarts_is_restarted_and_the_run_finishes(tmp_path,
                                                                            reference):
    """A torchrun job of 2 processes writes one run folder (rank 0's, its report too) and
    only rank 0 prints. Under --max-restarts 1, a worker SIGKILLed mid-epoch: the agent
    restarts both, they resume the run folder after its last saved epoch, and the run ends
    as one that was never interrupted (the same data stream and steps; the restarted
    attempt meets in a store of its own, see distributed.restart_store)."""
    runs = tmp_path / "runs"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "--max-restarts", "1", "-m", "cnnkit", "train", *JOB,
         "--dist-timeout", "30", "--out", str(runs / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True)
    seen = []
    for line in agent.stdout:  # epoch 0 is saved; epoch 1 has begun
        seen.append(line)
        if line.split()[:1] == ["1/4"]:
            break
    time.sleep(0.3)
    os.kill(_rank1_pid(agent, runs / "run"), signal.SIGKILL)
    try:
        out, err = agent.communicate(timeout=600)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 0, err[-3000:]
    out = "".join(seen) + out
    assert "resuming" in out and "2 processes (gloo)" in out
    # one run folder, written by rank 0; every epoch printed once, by rank 0 alone, the
    # killed epoch too (printed once, after the restart)
    assert os.listdir(runs) == ["run"]
    assert {"config.json", "metrics.csv", "last.pt", "best.pt", "report.html"} <= \
        set(os.listdir(runs / "run"))
    assert json.loads((runs / "run" / "config.json").read_text())["processes"] == 2
    assert [l.split()[0] for l in out.splitlines() if re.match(r"\s*\d+/\d+ ", l)] == \
        ["1/4", "2/4", "3/4", "4/4"]
    rows = _metrics(runs / "run")
    assert [r[0] for r in rows] == [0, 1, 2, 3]  # every epoch once
    # Both jobs are 2 processes with the same stream: closer than 1 against 2 processes
    for a, b in zip(rows, _metrics(reference)):
        assert a[1] == pytest.approx(b[1], rel=1e-3) and abs(a[4] - b[4]) * 360 <= 2
    restarted, uninterrupted = _final_state(runs / "run"), _final_state(reference)
    for name, value in uninterrupted.items():
        assert torch.allclose(restarted[name], value, atol=1e-4, rtol=1e-3), name


def test_two_agents_are_one_job_and_one_that_leaves_for_good_leaves_the_other_to_finish(
        tmp_path, reference):
    """Two torchrun agents (--nnodes 1:2, c10d rendezvous, --max-restarts 1) are one job of
    two processes, writing one run folder (global rank 0's) with the metrics of --nproc 2.
    Then the second machine (agent and worker) is killed for good during epoch 2; the first
    machine's worker loses its peer, its agent restarts it in a job of one, and it resumes
    the run folder and finishes alone."""
    run = tmp_path / "run"
    # last_call_timeout: how long round 0 waits for a second machine once the first is in
    # (it closes at once when both are). The second agent is started first and has done its
    # imports, but it reaches the store only at its next connection retry: 3 s after the
    # store opened on a busy machine, when a 2-s last call had closed round 0 without it
    # (and the scale-up that followed hung, see _agents). After the kill, the survivor's
    # round waits this long too.
    agents = _agents(run, "1:2", "--max-restarts", "1",
                     conf="join_timeout=600,last_call_timeout=20")
    try:
        _wait_for(lambda: (run / "metrics.csv").exists() and len(_metrics(run)) >= 2, *agents)
        # the machine goes: its agent and its worker (torchrun starts workers in sessions
        # of their own, so killing the agent's group alone would leave the worker running)
        worker = Path(f"/proc/{agents[1].pid}/task/{agents[1].pid}/children").read_text()
        os.killpg(agents[1].pid, signal.SIGKILL)
        for pid in worker.split():
            os.kill(int(pid), signal.SIGKILL)
    finally:
        out = _finish(agents)[0]
    assert agents[0].returncode == 0, _output(agents[0])
    # the job began with both: two processes, one run folder, epochs as --nproc 2 trains them
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]
    _like_the_reference(run, reference, rows=2)
    # after the restart the survivor is the job's rank 0, and says so
    assert re.search(r"resuming .* after epoch \d+ with 1 process\b", out), _output(agents[0])
    assert [r[0] for r in _metrics(run)] == [0, 1, 2, 3]

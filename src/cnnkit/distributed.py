"""Several processes, one training run: PyTorch's DistributedDataParallel, started by
torchrun (or `cnnkit train --nproc N`, which runs torchrun's own elastic agent in-process).

Each process learns who it is from the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE). Every process draws the same epoch order and the same
augmentation from the same seed and takes its share of each global batch, so the run is
the same run whatever the number of processes; only rank 0 prints and writes.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from .errors import CnnkitError, Interrupted, SettingsError, one_line_warnings


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launched: bool = False  # started by torchrun

    @property
    def enabled(self) -> bool:
        """Whether this process is part of a DDP job. A torchrun job of one process is one
        too (as in torchvision's references): the path that scales to N is the one tried."""
        return self.world > 1 or self.launched

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of a global batch (sizes differ by at most one)."""
        return batch.tensor_split(self.world)[self.rank] if self.enabled else batch


SINGLE = Dist()


class PeerFailure(CnnkitError):
    """Another process of the job died or stopped answering; this one stops too."""


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job's workers."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def from_env() -> Dist:
    """The process's place in a torchrun job; a single process when not started by one."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    return Dist(rank=int(os.environ.get("RANK", 0)), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)), launched=True)


@contextmanager
def process_group(dist: Dist, device: torch.device, timeout: float):
    """Join the job's process group for the duration: NCCL between GPUs, gloo between CPU
    processes. A collective that waits longer than `timeout` seconds for a process (a dead
    machine) fails instead of hanging; a process that dies on this machine is noticed by
    the elastic agent, which stops the others at once."""
    if not dist.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Processes on one machine share its cores instead of each taking all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))
    timeout = datetime.timedelta(seconds=timeout)
    store = restart_store(dist, timeout)
    try:
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                 **({"store": store, "rank": dist.rank, "world_size": dist.world}
                                    if store is not None else {}),
                                 **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError) as e:
        raise CnnkitError(f"could not join the distributed job (rank {dist.rank} of "
                          f"{dist.world}): {_first_line(e)}") from None
    try:
        with _peer_failures():
            yield
            # Leave together. A process that tore its group down while rank 0 was still
            # at work (writing the report) sometimes aborted in gloo's threads at exit
            # ("terminate called without an active exception", about 1 torchrun run in 10).
            tdist.barrier()
    finally:
        gc.collect()  # DDP's reducer sits in reference cycles: free it while Python is whole
        tdist.destroy_process_group()


def restart_store(dist: Dist, timeout: datetime.timedelta):
    """After a restart by torchrun's agent, the store the process group meets in, under keys
    of this attempt's own; None otherwise (init_process_group's env:// store).

    The agent's c10d rendezvous shares one TCPStore with every attempt of the job (PyTorch
    since 2.5, unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and init_process_group's keys
    carry no attempt: a restarted rank could read the address a dead rank of the attempt
    before had published, and fail with gloo's "Connection refused" or a connect timeout
    (pytorch/pytorch#135712; 2 of 6 restarts here, RESULTS.md section 14). The restart count
    is per agent, so prefixing with it keeps the attempts apart on one machine; on several
    machines the counts may differ, and only the variable above is safe."""
    restart = restart_count()
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if dist.local_world != dist.world:
        if dist.main:
            warnings.warn("torchrun restarted a job of several machines that share the "
                          "agent's store: if the process group cannot form, start torchrun "
                          "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment",
                          stacklevel=2)
        return None
    shared = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                            dist.world, is_master=False, timeout=timeout)
    return tdist.PrefixStore(f"cnnkit/restart-{restart}", shared)


@contextmanager
def _peer_failures():
    """A collective that fails because another process is gone becomes one clear line."""
    try:
        yield
    except (RuntimeError, tdist.DistError) as e:
        if not isinstance(e, tdist.DistError) and not any(
                s in str(e) for s in ("Connection closed by peer", "Connection reset by peer",
                                      "NCCL", "timed out", "Timed out", "Broken pipe")):
            raise
        raise PeerFailure(f"another process of the distributed job stopped or stopped "
                          f"answering ({_first_line(e)}); the job stops") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def all_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (in place)."""
    if dist.enabled:
        tdist.all_reduce(tensor)
    return tensor


def broadcast(dist: Dist, value):
    """Rank 0's `value` (any picklable object), on every process."""
    if not dist.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(dist: Dist, fn, *args):
    """fn(*args) run by rank 0 alone; every process gets its result, or raises its error
    (so a setting rank 0 refuses stops every process with the same message)."""
    if not dist.enabled:
        return fn(*args)
    outcome = None
    if dist.main:
        try:
            outcome = ("ok", fn(*args))
        except CnnkitError as e:
            outcome = ("error", e)
    kind, value = broadcast(dist, outcome)
    if kind == "error":
        if not dist.main:
            value.echo = True  # rank 0 reports it; the others stay quiet
        raise value
    return value


def gather(dist: Dist, value) -> list:
    """Every process's `value` (a picklable object), in rank order, on every process."""
    if not dist.enabled:
        return [value]
    out = [None] * dist.world
    tdist.all_gather_object(out, value)
    return out


def ddp(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module as this process trains it: wrapped in DistributedDataParallel under DDP
    (rebuild it when the set of trained parameters changes: DDP fixes it when built)."""
    if not dist.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_buffers(dist: Dist, module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere: without SyncBatchNorm each process's running
    statistics drift apart from its own share of the batches."""
    if dist.enabled:
        for buffer in module.buffers():
            tdist.broadcast(buffer, src=0)


def quiet_unless_main(dist: Dist) -> None:
    """Warnings (e.g. about skipped image files) are the same on every process: rank 0's
    are enough."""
    if not dist.main:
        warnings.simplefilter("ignore")


def launch(nproc: int, fn, *args, hint: str = ""):
    """Run fn(*args) in `nproc` processes on this machine under torchrun's elastic agent and
    return rank 0's result. A process that fails or dies stops the others at once; the
    error of the process that caused it is raised here as one CnnkitError (a dead process's
    ends with `hint`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent logs each failure with a traceback; cnnkit reports it in one line instead.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # A killed process leaves its semaphore to multiprocessing's tracker, which would warn.
    os.environ.setdefault("PYTHONWARNINGS",
                          "ignore::UserWarning:multiprocessing.resource_tracker")
    with tempfile.TemporaryDirectory(prefix="cnnkit-ddp-") as status:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                              run_id=f"cnnkit-{os.getpid()}", rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.2, start_method="spawn")
        # The agent replaces the handlers of these signals and leaves its own behind.
        handlers = {sig: signal.getsignal(sig) for sig in (
            signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
        try:
            return elastic_launch(config, _worker)(status, fn, args)[0]
        except ChildFailedError as e:
            raise _job_error(e, Path(status), hint) from None
        except SignalException as e:
            raise Interrupted(f"distributed training stopped by {e.sigval.name}{hint}"
                              ) from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)


def _worker(status: str, fn, args):
    dist = from_env()
    one_line_warnings()
    quiet_unless_main(dist)
    try:
        return fn(*args)
    except CnnkitError as e:
        if not getattr(e, "echo", False):
            record = {"kind": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
            (Path(status) / f"rank{dist.rank}.json").write_text(json.dumps(record))
        raise


def _job_error(failed, status: Path, hint: str) -> CnnkitError:
    """The one error that explains a failed job: a process's own error first, then a
    process that died, then the others' reactions to it (PeerFailure, interruption)."""
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in status.glob("rank*.json")}

    def error(rank: int, r: dict) -> CnnkitError:
        cls = {"SettingsError": SettingsError, "Interrupted": Interrupted,
               "PeerFailure": PeerFailure}.get(r["kind"], CnnkitError)
        e = cls(r["message"] if rank == 0 else f"rank {rank}: {r['message']}")
        e.exit_code = r["exit_code"]
        return e
    own = {k: r for k, r in reports.items() if r["kind"] not in ("PeerFailure", "Interrupted")}
    if own:
        rank = min(own)
        return error(rank, own[rank])
    for rank, failure in sorted(failed.failures.items()):
        if rank not in reports:
            how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 \
                else f"exited with status {failure.exitcode}"
            return CnnkitError(f"rank {rank} of the distributed job {how}; the other "
                               f"processes were stopped{hint}")
    rank = min(reports)
    return error(rank, reports[rank])

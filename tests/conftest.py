import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test`: one worker per core, at most 4) each worker and the
# processes it starts get an equal share of the cores. With PyTorch's default, every worker
# runs as many OpenMP threads as there are cores, and their spinning threads ran the suite
# 1.7 times slower than one worker (2 workers on 2 cores, 2026-12-04). Set before torch is
# imported, and inherited by the cnnkit and torchrun processes that tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(
        os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def shared_data() -> Path:
    """The real data in ../shared/data (see its README); CNNKIT_SHARED_DATA overrides."""
    candidates = [os.environ.get("CNNKIT_SHARED_DATA"), ROOT.parent / "shared" / "data",
                  "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "cifar10-subset").is_dir():
            return Path(c)
    raise RuntimeError("real test data not found: set CNNKIT_SHARED_DATA to the shared/data "
                       "folder (it holds cifar10-subset and cifar10-png-sample)")


@pytest.fixture(scope="session")
def cifar_subset() -> Path:
    return shared_data() / "cifar10-subset" / "cifar-10-batches-py"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    """398 real photos of ants and bees in train/ and val/ (JPEGs of many sizes)."""
    return shared_data() / "hymenoptera"


@pytest.fixture(scope="session")
def png_sample() -> Path:
    return shared_data() / "cifar10-png-sample"


@pytest.fixture(scope="session")
def png_run(tmp_path_factory, png_sample):
    """A small model trained for two epochs on the PNG sample, shared by several tests."""
    import cnnkit
    out = tmp_path_factory.mktemp("runs") / "png-run"
    return cnnkit.train(data=str(png_sample), recipe="tutorial", model="seed-simple", epochs=2,
                        batch_size=32, lr=0.01, out=str(out), seed=0, log=lambda s: None)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The suite needs no network: a download attempt fails as it does offline."""
    import socket
    import urllib.request

    def refuse(*a, **k):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)

"""`make demo`: train the default recipe and evaluate it, offline if need be."""
from __future__ import annotations

from typing import Callable

from .errors import DownloadError
from .evaluate import evaluate, format_report
from .train import TrainResult, train


def demo(data: str = "cifar10", *, log: Callable[[str], None] = print, **overrides) -> TrainResult:
    """Train on `data`; when it cannot be downloaded, say so in one line and use the
    digits that ship with scikit-learn instead."""
    try:
        result = train(data=data, log=log, **overrides)
    except DownloadError as e:
        log(f"{e} -- running the demo on scikit-learn's bundled digits instead")
        result = train(data="digits", log=log, **overrides)
    log(format_report(evaluate(result.run_dir)))
    return result

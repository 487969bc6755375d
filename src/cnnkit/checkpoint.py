"""Checkpoints: written atomically, read without running any code from them.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(..., weights_only=True)`; it holds what is needed to rebuild the model.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CnnkitError
from .models import create_model


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, flushed and renamed into place, so a
    crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise CnnkitError(f"no checkpoint at {path}; pass a run folder or a .pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and suggests weights_only=False; keep only the reason.
        text = str(e)
        if "GLOBAL" in text or "global" in text:
            reason = next(l for l in text.splitlines() if "GLOBAL" in l or "global" in l)
            raise CnnkitError(f"refusing to load {path}: it holds objects that could run "
                              f"code, not just weights ({reason.strip()[:200]})") from None
        raise CnnkitError(f"{path} is not a readable checkpoint (not a PyTorch weights "
                          "file, or a damaged one)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CnnkitError(f"{path} is not a readable checkpoint "
                          f"({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise CnnkitError(f"{path} is not a cnnkit checkpoint (no model name and weights)")
    return ckpt


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to feed it."""
    model: nn.Module
    name: str
    classes: list[str]
    image_size: tuple[int, int]
    in_channels: int
    mean: list[float]
    std: list[float]
    config: dict = field(default_factory=dict)
    path: str = ""


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from a run folder or checkpoint file, in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    model = create_model(ckpt["model"], num_classes=len(ckpt["classes"]),
                         in_channels=ckpt["in_channels"], image_size=tuple(ckpt["image_size"]),
                         **ckpt.get("model_args", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CnnkitError(f"{path}: weights do not fit model {ckpt['model']} "
                          f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
                          ) from None
    model.to(device).eval()
    return LoadedModel(model, ckpt["model"], list(ckpt["classes"]), tuple(ckpt["image_size"]),
                       ckpt["in_channels"], list(ckpt["mean"]), list(ckpt["std"]),
                       ckpt.get("config", {}), str(path))

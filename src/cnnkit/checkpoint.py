"""Checkpoints: written atomically, read without running any code from them.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
`torch.load(..., weights_only=True)`; it holds what is needed to rebuild the model.
The same weights can be saved as safetensors, with the rest as JSON metadata; every
function here that reads a checkpoint accepts either.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CnnkitError
from .models import create_model

# What a checkpoint carries besides weights, and what travels in safetensors metadata.
META_KEYS = ("model", "model_args", "classes", "in_channels", "image_size", "mean", "std",
             "epoch", "metrics", "config", "data_source")


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, flushed and renamed into place, so a
    crash at any moment leaves either the old file or the new one, never half of one.
    A failed write (disk full, no permission) leaves the old file and raises CnnkitError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CnnkitError(f"cannot write {path}: {what}; the previous version of the file, "
                          "if any, is untouched") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def save_safetensors(path: Path, ckpt: dict) -> None:
    """The checkpoint's weights as safetensors; the rest as JSON in its metadata."""
    from safetensors.torch import save

    meta = {k: json.dumps(ckpt[k]) for k in META_KEYS if k in ckpt}
    tensors = {k: v.contiguous() for k, v in ckpt["state_dict"].items()}
    atomic_write(Path(path), lambda f: f.write(save(tensors, metadata=meta)))


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        ckpt = {k: json.loads(v) for k, v in meta.items() if k in META_KEYS}
    except (SafetensorError, ValueError, OSError) as e:
        raise CnnkitError(f"{path} is not a readable safetensors file ({e})") from None
    if "model" not in ckpt or "classes" not in ckpt:
        raise CnnkitError(f"{path} holds weights but not cnnkit's metadata (model name, "
                          "classes); export it with `cnnkit export --format safetensors`")
    return {**ckpt, "state_dict": state}


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise CnnkitError(f"no checkpoint at {path}; pass a run folder or a .pt file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
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


def describe(model: str, classes: int, in_channels: int, image_size) -> str:
    h, w = image_size
    return f"{model} for {classes} classes at {in_channels}×{h}×{w}"


def load_weights(model: nn.Module, ckpt: dict, target: str, source: str) -> None:
    """Copy a checkpoint's weights into `model`, or fail naming both sides."""
    state = ckpt["state_dict"]
    own = model.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own]
    if wrong or extra:
        src = describe(ckpt["model"], len(ckpt["classes"]), ckpt["in_channels"],
                       ckpt["image_size"])
        key = (wrong or extra)[0]
        detail = (f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                  if key in state and key in own else f"{key} only on one side")
        raise CnnkitError(f"{source} holds {src}, which does not fit {target} "
                          f"({len(wrong) + len(extra)} tensors differ, e.g. {detail})")
    model.load_state_dict(state)


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
    takes_pixels: bool = False  # an exported model that normalizes uint8 pixels itself
    metrics: dict = field(default_factory=dict)  # the saved epoch's metrics (val_acc, ...)
    data_source: str = ""  # the run's data: an absolute path or a data set name


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from a run folder, checkpoint or safetensors file, in eval mode; an
    exported .onnx file loads for inference with onnxruntime."""
    if str(path).endswith(".onnx"):
        from .export import load_onnx
        return load_onnx(path)
    ckpt = read_checkpoint(path)
    size = tuple(ckpt["image_size"])
    model = create_model(ckpt["model"], num_classes=len(ckpt["classes"]),
                         in_channels=ckpt["in_channels"], image_size=size,
                         **ckpt.get("model_args", {}))
    load_weights(model, ckpt, describe(ckpt["model"], len(ckpt["classes"]),
                                       ckpt["in_channels"], size), str(path))
    model.to(device).eval()
    return LoadedModel(model, ckpt["model"], list(ckpt["classes"]), size,
                       ckpt["in_channels"], list(ckpt["mean"]), list(ckpt["std"]),
                       ckpt.get("config", {}), str(path), metrics=ckpt.get("metrics") or {},
                       data_source=ckpt.get("data_source") or "")

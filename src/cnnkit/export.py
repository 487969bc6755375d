"""`export`: a run's model in another format. safetensors now; ONNX and TorchScript next."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import read_checkpoint, save_safetensors
from .errors import CnnkitError, unknown_choice

FORMATS = ("safetensors",)


def export(run, out: str | Path, *, fmt: str = "safetensors") -> Path:
    if fmt not in FORMATS:
        raise unknown_choice("export format", fmt, FORMATS)
    out = Path(out)
    if out.exists():
        raise CnnkitError(f"{out} already exists; cnnkit never overwrites a file: pick "
                          "another --out")
    ckpt = read_checkpoint(run)
    save_safetensors(out, ckpt)
    return out

"""`export`: a trained model for other runtimes. Every export takes uint8 pixels
(N, C, H, W) with a dynamic batch dimension, normalizes them itself, returns logits, carries
its class names and input size, and is verified against PyTorch when written."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .version import __version__
from .checkpoint import LoadedModel, OnnxModel, load, read_checkpoint, save_safetensors
from .errors import CnnkitError, SettingsError, unknown_choice
from .progress import bar

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4


class PixelModel(nn.Module):
    """uint8 pixels in, logits out: normalization travels inside the exported model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels.float() / 255 - self.mean) / self.std)


def metadata(lm: LoadedModel) -> dict:
    return {"classes": lm.classes, "input_size": [lm.in_channels, *lm.image_size],
            "input": "uint8 pixels, N×C×H×W", "output": "logits (softmax gives probabilities)",
            "model": lm.name, "cnnkit_version": __version__}


def export(run, out: str | Path, *, fmt: str = "onnx", check_images: torch.Tensor | None = None
           ) -> Path:
    """Write `run` (a run folder or checkpoint) as `fmt` to `out` and verify it."""
    if fmt not in FORMATS:
        raise unknown_choice("export format", fmt, FORMATS)
    out = Path(out)
    if out.exists():
        raise SettingsError(f"{out} already exists; cnnkit never overwrites a file: pick "
                            "another --out")
    if fmt == "safetensors":
        save_safetensors(out, read_checkpoint(run))
        return out
    lm = load(run, "cpu")
    wrapped = PixelModel(lm.model, lm.mean, lm.std).eval()
    images = check_images if check_images is not None else _real_images(lm)
    example = images[:2]
    steps = bar(total=2, desc=f"writing {fmt}", unit="step")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _write_onnx(wrapped, example, out, metadata(lm))
            else:
                traced = torch.jit.trace(wrapped, example)
                traced.save(str(out), _extra_files={"cnnkit.json": json.dumps(metadata(lm))})
            steps.update()
            steps.set_description_str("verifying against PyTorch")
            worst = _largest_difference(wrapped, load_exported(out, fmt), images)
            steps.update()
    except CnnkitError:
        out.unlink(missing_ok=True)
        raise
    except Exception as e:  # an exporter's failure: one line, nothing half-written left
        out.unlink(missing_ok=True)
        raise CnnkitError(f"{fmt} export of {lm.name} failed: "
                          f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
                          ) from None
    finally:
        steps.close()
    if worst > TOLERANCE:
        out.unlink(missing_ok=True)
        raise CnnkitError(f"{fmt} export does not match PyTorch: largest difference "
                          f"{worst:.3g} in the logits (tolerance {TOLERANCE:g}); nothing written")
    return out


def _write_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict) -> None:
    import onnx
    torch.onnx.export(model, (example,), str(out), input_names=["pixels"],
                      output_names=["logits"], dynamo=False,
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))


def _real_images(lm: LoadedModel, n: int = 32) -> torch.Tensor:
    """Validation images of the run's own data, to verify the export on; random pixels only
    when that data is no longer there."""
    try:
        return lm.info.load_data().val.images[:n]
    except (CnnkitError, OSError):
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, lm.in_channels, *lm.image_size), generator=g,
                             dtype=torch.uint8)


def load_exported(path: Path, fmt: str):
    if fmt == "onnx":
        return OnnxModel(path)
    return torch.jit.load(str(path)).eval()


@torch.no_grad()
def _largest_difference(reference: nn.Module, exported, images: torch.Tensor) -> float:
    worst = 0.0
    for batch in (images[:1], images):  # a batch of one and a larger one: dynamic batch
        worst = max(worst, float((exported(batch) - reference(batch)).abs().max()))
    return worst

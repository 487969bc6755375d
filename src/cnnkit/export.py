"""`export`: a trained model for other runtimes. Every export takes uint8 pixels
(N, C, H, W) with a dynamic batch dimension, normalizes them itself, returns logits, carries
its class names and input size, and is verified against PyTorch when written."""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .version import __version__
from .checkpoint import LoadedModel, OnnxModel, load, read_checkpoint, save_safetensors
from .errors import CnnkitError, SettingsError, first_line, unknown_choice
from .metrics import over_thresholds
from .progress import bar

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4
CALIBRATION_IMAGES = 1024


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
    meta = {"classes": lm.classes, "input_size": [lm.in_channels, *lm.image_size],
            "input": "uint8 pixels, N×C×H×W", "output": "logits (softmax gives probabilities)",
            "model": lm.name, "cnnkit_version": __version__, "multi_label": lm.multi_label}
    if lm.multi_label:
        meta["output"] = ("logits (a sigmoid per label gives its probability; a label is "
                          "called when that reaches its entry in thresholds)")
        meta["thresholds"] = list(lm.thresholds)
    return meta


def export(run, out: str | Path, *, fmt: str = "onnx", check_images: torch.Tensor | None = None,
           int8: bool = False, max_drop: float = 1.0) -> Path:
    """Write `run` (a run folder or checkpoint) as `fmt` to `out` and verify it.

    `int8` (onnx only): quantized by onnxruntime, calibrated on the run's training images,
    and kept only if its validation accuracy (a multi-label model's: of its (image, label)
    calls at its thresholds) is at most `max_drop` points below the float model's (the numbers are in the file's metadata, under "int8")."""
    if fmt not in FORMATS:
        raise unknown_choice("export format", fmt, FORMATS)
    if int8 and fmt != "onnx":
        raise SettingsError("--int8 quantizes ONNX exports; drop it or use --format onnx")
    out = Path(out)
    if out.exists():
        raise SettingsError(f"{out} already exists; cnnkit never overwrites a file: pick "
                            "another --out")
    if int8:
        return export_int8(run, out, max_drop)
    if fmt == "safetensors":
        save_safetensors(out, read_checkpoint(run))
        return out
    lm = load(run, "cpu")
    wrapped = PixelModel(lm.model, lm.mean, lm.std).eval()
    images = check_images if check_images is not None else _real_images(lm)
    example = images[:2]
    steps = bar(total=2, desc=f"writing {fmt}", unit="step")
    with one_file_or_none(out, f"{fmt} export of {lm.name}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            _write_onnx(wrapped, example, out, metadata(lm))
        else:
            traced = torch.jit.trace(wrapped, example)
            traced.save(str(out), _extra_files={"cnnkit.json": json.dumps(metadata(lm))})
        steps.update()
        steps.set_description_str("verifying against PyTorch")
        worst, scale = _largest_difference(wrapped, load_exported(out, fmt), images)
        steps.update()
    steps.close()
    # float32 rounding grows with the logits: past 1, the tolerance is relative to them
    if worst > TOLERANCE * max(1.0, scale):
        out.unlink(missing_ok=True)
        raise CnnkitError(f"{fmt} export does not match PyTorch: largest difference "
                          f"{worst:.3g} in logits up to {scale:.3g} (tolerance {TOLERANCE:g}"
                          f"{f' × {scale:.3g}' if scale > 1 else ''}); nothing written")
    return out


def _write_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict) -> None:
    # torch.export's exporter, the one PyTorch maintains; one self-contained file.
    program = torch.onnx.export(model, (example,), input_names=["pixels"],
                                output_names=["logits"], dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(out), external_data=False)
    _add_metadata(out, meta)


def _add_metadata(path: Path, meta: dict) -> None:
    import onnx
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def export_int8(run, out: Path, max_drop: float) -> Path:
    """onnxruntime's static quantization (int8 weights per channel, uint8 activations, QDQ)
    calibrated on the run's training images; measured against the float export on every
    validation image, and refused past `max_drop` points of accuracy."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    lm = load(run, "cpu")
    try:
        data = lm.info.load_data()
    except (CnnkitError, OSError) as e:
        raise CnnkitError(f"--int8 calibrates on the run's training images, which cannot be "
                          f"read: {e}") from None
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(data.train), generator=g)[:CALIBRATION_IMAGES]
    calibration = data.train.subset(pick).head(CALIBRATION_IMAGES)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration.split(32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch.numpy()}

    # the quantizer warns on the root logger about every tensor it leaves in float
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    float_file = out.with_name(out.name + ".float.tmp")
    prepared = out.with_name(out.name + ".prep.tmp")
    try:
        with one_file_or_none(out, f"int8 export of {lm.name}"):
            # verified on the validation images already loaded, not read a second time
            export(run, float_file, fmt="onnx", check_images=data.val.head(32))
            quant_pre_process(str(float_file), str(prepared), skip_symbolic_shape=True)
            steps = bar(total=1, desc="calibrating int8", unit="step")
            # reduce_range: 7-bit weights, because AVX2 without VNNI can saturate u8×s8 sums.
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
            steps.close()
            report = compare_on_val(OnnxModel(float_file), OnnxModel(out), data.val,
                                    thresholds=lm.thresholds)
            # the file carries what it was measured at: `cnnkit export` prints it from there
            _add_metadata(out, metadata(lm) | {"int8": report | {
                "calibration_images": len(calibration), "method": "onnxruntime static, QDQ, "
                "per-channel int8 weights, uint8 activations"}})
    finally:
        root.setLevel(level)
        float_file.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    if report["drop_points"] > max_drop:
        out.unlink(missing_ok=True)
        raise CnnkitError(
            f"int8 export refused: validation accuracy {report['int8_accuracy']:.4f} against "
            f"{report['float_accuracy']:.4f} for the float model, a drop of "
            f"{report['drop_points']:.2f} points (most allowed {max_drop:g}: --max-drop); "
            f"{agreement_name(report)} {report['agreement']:.4f}; nothing written")
    return out


@contextlib.contextmanager
def one_file_or_none(out: Path, what: str):
    """Whatever fails inside leaves no file at `out`; an exporter's or quantizer's own error
    becomes one line naming `what`."""
    try:
        yield
    except CnnkitError:
        out.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - the libraries' errors have many types
        out.unlink(missing_ok=True)
        raise CnnkitError(f"{what} failed: {first_line(e, 300)}") from None


def agreement_name(report: dict) -> str:
    """What the agreement of an int8 report counts: top-1 classes, or label calls."""
    return "agreement of the label calls" if report.get("per") == "label" else \
        "top-1 agreement"


def compare_on_val(reference, quantized, val, batch_size: int = 256,
                   thresholds: list[float] | None = None) -> dict:
    """Accuracy of both models, their top-1 agreement and the drop, on a validation split.
    Multi-label (labels (N, K), with the model's `thresholds`): the accuracy of every
    (image, label) call, and the share of those calls on which the two models agree."""
    right_ref = right_q = same = 0
    batches = torch.arange(len(val)).split(batch_size)
    for _, images, labels in bar(val.iterate(batches, "cpu"), total=len(batches),
                                 desc="measuring int8", unit="batch"):
        if labels.ndim == 2:
            a, b = (over_thresholds(model(images).sigmoid(), thresholds)
                    for model in (reference, quantized))
            labels = labels > 0.5
        else:
            a, b = reference(images).argmax(1), quantized(images).argmax(1)
        right_ref += int((a == labels).sum())
        right_q += int((b == labels).sum())
        same += int((a == b).sum())
    n = max(val.labels[:1].numel() * len(val), 1)  # calls: one per image, or K per image
    return {"images": len(val), "float_accuracy": right_ref / n, "int8_accuracy": right_q / n,
            "drop_points": 100 * (right_ref - right_q) / n, "agreement": same / n,
            **({"per": "label"} if val.labels.ndim == 2 else {})}


def _real_images(lm: LoadedModel, n: int = 32) -> torch.Tensor:
    """Validation images of the run's own data, to verify the export on; random pixels only
    when that data is no longer there."""
    try:
        return lm.info.load_data().val.head(n)
    except (CnnkitError, OSError):
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, lm.in_channels, *lm.image_size), generator=g,
                             dtype=torch.uint8)


def load_exported(path: Path, fmt: str):
    if fmt == "onnx":
        return OnnxModel(path)
    return torch.jit.load(str(path)).eval()


@torch.no_grad()
def _largest_difference(reference: nn.Module, exported, images: torch.Tensor
                        ) -> tuple[float, float]:
    """The largest difference in the logits, and the largest logit."""
    worst = scale = 0.0
    for batch in (images[:1], images):  # a batch of one and a larger one: dynamic batch
        want = reference(batch)
        worst = max(worst, float((exported(batch) - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return worst, scale

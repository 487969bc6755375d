"""The saved-run format, with one writer and one reader for each of its files.

A run is described by a `RunInfo`: its Config and the facts of its data and model. It is
written to config.json (flat: the Config's fields, then the facts) and into every
checkpoint, and read back from either by `RunInfo.from_dict`. A checkpoint is a plain
dict of tensors, numbers, strings and lists (`build_checkpoint`), so it loads with
`torch.load(..., weights_only=True)` and never runs code. The same weights can be saved
as safetensors, with the RunInfo as JSON metadata; an exported .onnx file loads for
inference too. Checkpoints of earlier cnnkit versions (the facts at the top level) load.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .version import __version__
from .config import Config, field_names
from .data import BUILTIN, Dataset, load_dataset
from .errors import CnnkitError, SettingsError, first_line
from .models import create_model, is_zoo_name, model_entry

FORMAT = 2  # 1: cnnkit 0.1's checkpoints, the facts at the top level


@dataclass
class RunInfo:
    """What a run is: its settings and the facts of its data and model."""
    config: Config
    classes: list[str]
    in_channels: int
    input_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    model_args: dict = field(default_factory=dict)
    data_source: str = ""   # the data as an absolute path or data set name (config.data
                            # is as typed, relative to where the run was started)
    val_name: str = "val"
    num_train: int = 0
    num_val: int = 0
    processes: int = 1
    run_dir: str = ""
    cnnkit_version: str = __version__
    torch_version: str = str(torch.__version__)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def of_run(cls, cfg: Config, ds: Dataset, mean, std, model_args: dict, *,
               processes: int = 1, run_dir: str | Path = "") -> "RunInfo":
        return cls(cfg, list(ds.classes), ds.in_channels, tuple(ds.image_size), list(mean),
                   list(std), dict(model_args), ds.source, ds.val_name, len(ds.train),
                   len(ds.val), processes, str(run_dir))

    def to_dict(self) -> dict:
        facts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "config"}
        facts["input_size"] = list(self.input_size)
        facts["num_classes"] = len(self.classes)
        return {**self.config.to_dict(), **facts}

    @classmethod
    def from_dict(cls, d: dict) -> "RunInfo":
        """From config.json, a checkpoint's "run", or a cnnkit 0.1 checkpoint."""
        if "run" in d:
            return cls.from_dict(d["run"])
        if "state_dict" in d and "config" in d:  # format 1: facts at the top, config nested
            d = {**d["config"], "model": d["model"], "input_size": d["image_size"],
                 **{k: d[k] for k in ("classes", "in_channels", "mean", "std", "model_args",
                                      "data_source") if k in d}}
        known = {f.name for f in dataclasses.fields(cls)} - {"config"}
        return cls(Config(**{k: d[k] for k in field_names() if k in d}),
                   **{k: (tuple(d[k]) if k == "input_size" else d[k]) for k in known if k in d})

    def model_description(self) -> str:
        return model_description(self.config.model, len(self.classes), self.in_channels,
                        self.input_size)

    def build_model(self) -> nn.Module:
        """The run's model, freshly initialised (load its weights next)."""
        return create_model(self.config.model, num_classes=len(self.classes),
                            in_channels=self.in_channels, image_size=self.input_size,
                            **self.model_args)

    def load_data(self, source: str | None = None) -> Dataset:
        """The data the run trained on, rebuilt with its own settings (the same validation
        split for the same seed), at its input size, from any working folder."""
        cfg = self.config
        source = source or self.data_source or cfg.data
        if source.lower() not in BUILTIN and not Path(source).exists():
            raise CnnkitError(f"no such folder: {cfg.data} (looked in "
                              f"{Path(source).absolute()}); the run's data has moved: pass "
                              "--data PATH")
        return load_dataset(source, data_dir=cfg.data_dir, image_size=self.input_size[0],
                            val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict,
                            max_memory=cfg.max_memory, stream=True if cfg.stream else None,
                            channels=self.in_channels, multi_label=cfg.multi_label)


def model_description(model: str, classes: int, in_channels: int, image_size) -> str:
    h, w = image_size
    return f"{model} for {classes} classes at {in_channels}×{h}×{w}"


# --- writing ----------------------------------------------------------------------------

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


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def build_checkpoint(info: RunInfo, model: nn.Module, epoch: int, metrics: dict,
                     thresholds: list[float] | None = None) -> dict:
    """The one place a checkpoint is put together: the run, the epoch and its metrics, the
    weights (on the CPU), and for a multi-label model the per-label thresholds chosen on
    this epoch's validation probabilities (plain floats: loadable with weights_only).
    `last.pt` adds a "train_state" (see `training_state`)."""
    ckpt = {"format": FORMAT, "run": info.to_dict(), "epoch": epoch, "metrics": metrics,
            "state_dict": cpu_state(model)}
    if thresholds is not None:
        ckpt["thresholds"] = [float(t) for t in thresholds]
    return ckpt


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def save_safetensors(path: Path, ckpt: dict) -> None:
    """The checkpoint's weights as safetensors; the run, epoch and metrics as JSON in its
    metadata."""
    from safetensors.torch import save

    meta = {"format": json.dumps(FORMAT), "run": json.dumps(ckpt["run"]),
            "epoch": json.dumps(ckpt.get("epoch")), "metrics": json.dumps(ckpt.get("metrics"))}
    if ckpt.get("thresholds") is not None:
        meta["thresholds"] = json.dumps(ckpt["thresholds"])
    tensors = {k: v.contiguous() for k, v in ckpt["state_dict"].items()}
    atomic_write(Path(path), lambda f: f.write(save(tensors, metadata=meta)))


def training_state(model, optimizer, scheduler, ema, generator, device: torch.device,
                   steps_done: int, total_steps: int, history: list[dict], scaler=None
                   ) -> dict:
    """Everything --resume needs to continue exactly where the run stopped."""
    return {"model": cpu_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": cpu_state(ema) if ema else None,
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "steps_done": steps_done, "total_steps": total_steps, "history": history}


def restore_training_state(state: dict, model, optimizer, scheduler, ema, generator,
                           device: torch.device, scaler=None) -> int:
    """Put a run back as `training_state` found it; returns the steps done."""
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["steps_done"]


# --- reading ----------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        meta = {k: json.loads(v) for k, v in meta.items()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CnnkitError(f"{path} is not a readable safetensors file ({e})") from None
    if "run" not in meta and not {"model", "classes"} <= set(meta):
        raise CnnkitError(f"{path} holds weights but not cnnkit's metadata (model name, "
                          "classes); export it with `cnnkit export --format safetensors`")
    return {**meta, "state_dict": state}


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint (best.pt of a run folder, else last.pt; a .pt or .safetensors file) as
    a dict in the current format, whichever cnnkit version wrote it."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    return as_checkpoint(read_weights_file(path), path)


def read_weights_file(path: str | Path):
    """A .pt or .safetensors file's contents as saved, read without running any code."""
    path = Path(path)
    if not path.exists():
        raise CnnkitError(f"no checkpoint at {path}; pass a run folder or a .pt file")
    return _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)


def is_checkpoint(raw) -> bool:
    """Whether a file's contents are a cnnkit checkpoint (of any version), not a bare
    state_dict."""
    return isinstance(raw, dict) and "state_dict" in raw and ("run" in raw or "model" in raw)


def as_checkpoint(raw, path: str | Path) -> dict:
    """A file's contents as a checkpoint in the current format, or one clear error."""
    if not is_checkpoint(raw):
        raise CnnkitError(f"{path} is not a cnnkit checkpoint (no model name and weights)")
    if "run" not in raw:  # format 1
        raw = {"format": 1, "run": RunInfo.from_dict(raw).to_dict(),
               **{k: raw[k] for k in ("epoch", "metrics", "state_dict", "train_state")
                  if k in raw}}
    return raw


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
                          f"({first_line(e, 200)})") from None


def read_run(run_dir: str | Path) -> tuple[RunInfo, dict]:
    """A run folder's RunInfo and its last.pt, for --resume."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if not (run_dir / "config.json").is_file() or not last.is_file():
        raise SettingsError(f"--resume {run_dir}: not a run folder with a completed epoch "
                          "(config.json and last.pt)")
    ckpt = read_checkpoint(last)
    if ckpt.get("train_state") is None:
        raise SettingsError(f"{last} holds no training state to resume from")
    return RunInfo.from_dict(ckpt["run"]), ckpt


def load_weights(model: nn.Module, ckpt: dict, target: str, source: str) -> None:
    """Copy a checkpoint's weights into `model`, or fail naming both sides."""
    state = ckpt["state_dict"]
    own = model.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own]
    if wrong or extra:
        key = (wrong or extra)[0]
        detail = (f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                  if key in state and key in own else f"{key} only on one side")
        raise CnnkitError(f"{source} holds {RunInfo.from_dict(ckpt).model_description()}, which does "
                          f"not fit {target} ({len(wrong) + len(extra)} tensors differ, e.g. "
                          f"{detail})")
    model.load_state_dict(state)


@dataclass
class LoadedModel:
    """A model ready for inference, with its run: what is needed to feed it."""
    model: nn.Module
    info: RunInfo
    path: str = ""
    takes_pixels: bool = False  # an exported model that normalizes uint8 pixels itself
    metrics: dict = field(default_factory=dict)  # the saved epoch's metrics (val_acc, ...)
    # multi-label: a label is called when its sigmoid probability reaches its threshold
    thresholds: list[float] | None = None

    def __post_init__(self):
        if self.multi_label and self.thresholds is None:
            self.thresholds = [0.5] * len(self.classes)

    @property
    def multi_label(self) -> bool:
        """Whether the model gives each image a set of labels (sigmoid outputs)."""
        return self.info.config.multi_label

    @property
    def name(self) -> str:
        return self.info.config.model

    @property
    def config(self) -> Config:
        return self.info.config

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info.input_size)

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def mean(self) -> list[float]:
        return self.info.mean

    @property
    def std(self) -> list[float]:
        return self.info.std


def load(path: str | Path, device: str | torch.device = "cpu",
         weights: str | Path | None = None) -> LoadedModel:
    """Rebuild a model from a run folder, checkpoint or safetensors file, in eval mode; an
    exported .onnx file loads for inference with onnxruntime; a torchvision or timm model's
    name (tv:NAME, timm:NAME) loads it with its pretrained weights and their own classes
    (`load_pretrained`)."""
    if is_zoo_name(path) and not Path(path).exists():
        return load_pretrained(str(path), weights, device)
    if weights is not None:
        raise SettingsError(f"--weights is for a pretrained model's name (tv:NAME, "
                            f"timm:NAME); {path} holds its own weights")
    if str(path).endswith(".onnx"):
        return load_onnx(path)
    ckpt = read_checkpoint(path)
    info = RunInfo.from_dict(ckpt)
    model = info.build_model()
    load_weights(model, ckpt, info.model_description(), str(path))
    model.to(device).eval()
    return LoadedModel(model, info, str(path), metrics=ckpt.get("metrics") or {},
                       thresholds=ckpt.get("thresholds"))


def load_pretrained(name: str, weights: str | Path | None = None,
                    device: str | torch.device = "cpu") -> LoadedModel:
    """A torchvision or timm model with its pretrained weights and their own head, to
    predict the classes it learnt (ImageNet's) with no training: the library's weights
    (downloaded once), or `weights`, a local copy as the family saves them (timm's
    EfficientNets also take EfficientNet-PyTorch's). Input size and normalization are the
    weights' own."""
    entry = model_entry(name)
    if entry.pretrained_info is None:
        raise SettingsError(f"{name} has no pretrained weights of its own; predict with a "
                            "run folder trained with cnnkit")
    if weights is not None and is_checkpoint(read_weights_file(weights)):
        raise SettingsError(f"{weights} is a cnnkit checkpoint: predict with it directly, "
                            "in place of the model's name")
    classes = entry.pretrained_classes()
    facts = entry.pretrained_info()
    size = (facts["image_size"], facts["image_size"])
    model = create_model(name, num_classes=len(classes), in_channels=3, image_size=size)
    source = str(weights) if weights is not None else f"the pretrained weights of {name}"
    model.load_pretrained(read_weights_file(weights) if weights is not None else
                          entry.pretrained_state(), source, head=True)
    model.to(device).eval()
    info = RunInfo(Config(model=name, tta=0, flip="none"), classes, 3, size,
                   list(facts["mean"]), list(facts["std"]), data_source=facts["weights"])
    return LoadedModel(model, info, source)


# --- exported models --------------------------------------------------------------------

class OnnxModel:
    """An exported ONNX model run by onnxruntime, called like a module on uint8 pixels."""

    def __init__(self, path: Path):
        import onnxruntime
        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=["CPUExecutionProvider"])
        self.meta = {}
        for key, value in self.session.get_modelmeta().custom_metadata_map.items():
            try:  # cnnkit's entries are JSON; tools along the way may add plain strings
                self.meta[key] = json.loads(value)
            except ValueError:
                self.meta[key] = value

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixels": pixels.cpu().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


def load_onnx(path: str | Path) -> LoadedModel:
    """An exported .onnx file as a LoadedModel that takes pixels (for `cnnkit predict`)."""
    model = OnnxModel(Path(path))
    meta = model.meta
    if "classes" not in meta or "input_size" not in meta:
        raise CnnkitError(f"{path} is an ONNX model without cnnkit's metadata (classes, input "
                          "size); export it with `cnnkit export --format onnx`")
    c, h, w = meta["input_size"]
    # Normalization is inside the model; it was verified without test-time augmentation.
    info = RunInfo(Config(model=meta.get("model", "onnx"), tta=0, flip="none",
                          multi_label=bool(meta.get("multi_label", False))),
                   list(meta["classes"]), c, (h, w), [0.0] * c, [1.0] * c)
    return LoadedModel(model, info, str(path), takes_pixels=True,
                       thresholds=meta.get("thresholds"))

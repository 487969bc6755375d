"""One dataclass holds every training setting; a recipe is a named set of overrides.

The resolved Config is saved as config.json with every run, so a run can always be
explained and repeated. The CLI builds its `train` flags from these fields.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import CnnkitError


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- what to train on -------------------------------------------------------
    data: str = _f("cifar10", "cifar10, cifar100, mnist, fashion-mnist, digits, or a PATH "
                   "(cifar-10-batches-py / cifar-100-python folder, or an image folder)")
    data_dir: str | None = _f(None, "download cache (default $CNNKIT_DATA or ~/.cache/cnnkit)")
    image_size: int | None = _f(None, "resize images to SIZE×SIZE (default: the data set's "
                                "own size; 32 for image folders)")
    val_fraction: float | None = _f(None, "hold out this fraction of train for validation "
                                    "(default: the test split if there is one, else 0.2)")
    strict: bool = _f(False, "unreadable images in a folder are an error, not a warning")
    # --- the model --------------------------------------------------------------
    model: str = _f("seed-cnn", "model name (see `cnnkit models`)")
    # --- optimisation -----------------------------------------------------------
    epochs: int = _f(10, "passes over the training set")
    batch_size: int = _f(32, "images per optimizer step")
    optimizer: str = _f("sgd", "sgd or adamw", choices=["sgd", "adamw"])
    lr: float = _f(0.001, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "use Nesterov momentum with SGD")
    weight_decay: float = _f(0.0, "L2 weight decay")
    schedule: str = _f("constant", "lr schedule, stepped per batch: constant, onecycle, "
                       "linear (warm-up then linear decay)",
                       choices=["constant", "onecycle", "linear"])
    warmup: float = _f(0.0, "fraction of steps spent warming up (onecycle, linear)")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    # --- input pipeline ---------------------------------------------------------
    normalize: bool = _f(False, "subtract the training set's per-channel mean and divide by "
                         "its std (off: pixels scaled to [0, 1] only)")
    flip: str = _f("none", "horizontal flip augmentation: none, random, alternate",
                   choices=["none", "random", "alternate"])
    translate: int = _f(0, "random translation by up to PX pixels (reflect padding)")
    cutout: int = _f(0, "cut out a random PX×PX square from each image (0: off)")
    # --- bookkeeping ------------------------------------------------------------
    seed: int = _f(0, "random seed; on the CPU the same seed gives the same run")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N")
    eval_batch_size: int = _f(500, "images per batch when evaluating")
    out: str | None = _f(None, "run folder (default runs/<data>-<model>[-N]); never overwritten")
    recipe: str = _f("tutorial", "named set of defaults (see `cnnkit recipes`)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# A recipe names the settings of a known training run; anything given explicitly wins.
RECIPES: dict[str, dict[str, Any]] = {
    # The first tutorial, exactly: seed-cnn, 10 epochs, batch 32, SGD(lr=1e-3,
    # momentum=0.9), cross-entropy, ToTensor() only (no normalization, no augmentation).
    "tutorial": dict(model="seed-cnn", epochs=10, batch_size=32, optimizer="sgd", lr=0.001,
                     momentum=0.9, nesterov=False, weight_decay=0.0, schedule="constant",
                     warmup=0.0, label_smoothing=0.0, normalize=False, flip="none",
                     translate=0, cutout=0),
}

DEFAULT_RECIPE = "tutorial"


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def make_config(recipe: str | None = None, **overrides: Any) -> Config:
    """Config = dataclass defaults, then the recipe's settings, then explicit overrides."""
    recipe = recipe or overrides.pop("recipe", None) or DEFAULT_RECIPE
    overrides.pop("recipe", None)
    if recipe not in RECIPES:
        raise CnnkitError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    unknown = set(overrides) - set(field_names())
    if unknown:
        raise CnnkitError(f"unknown setting(s) {', '.join(sorted(unknown))}; "
                          f"valid settings: {', '.join(field_names())}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = Config(recipe=recipe, **values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise CnnkitError(f"--{name.replace('_', '-')} must be at least 1, "
                              f"got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise CnnkitError(f"--lr must be positive, got {cfg.lr}")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise CnnkitError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise CnnkitError(f"--image-size must be positive, got {cfg.image_size}")
    for f in dataclasses.fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise CnnkitError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r} is not "
                              f"valid; choose one of: {', '.join(choices)}")

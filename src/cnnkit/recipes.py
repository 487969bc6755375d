"""Recipes: named sets of Config overrides, resolved against the model and the data.

A model's registry entry names its family's recipe (finetune for torchvision and timm
models) and its widths; this module asks it, so config.py (which the models may name)
never imports the models.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config import Config, field_names, validate
from .errors import SettingsError, unknown_choice
from .models import model_entry


# A recipe names the settings of a known training run; anything given explicitly wins.
RECIPES: dict[str, dict[str, Any]] = {
    # The first tutorial, exactly: seed-cnn, 10 epochs, batch 32, SGD(lr=1e-3,
    # momentum=0.9), cross-entropy, ToTensor() only (no normalization, no augmentation).
    "tutorial": dict(model="seed-cnn", epochs=10, batch_size=32, optimizer="sgd", lr=0.001,
                     momentum=0.9, nesterov=False, weight_decay=0.0, schedule="constant",
                     warmup=0.0, label_smoothing=0.0, normalize=False, flip="none",
                     translate=0, cutout=0, tta=0, ema=0.0, norm_bias_lr_mult=1.0),
    # The default: the best accuracy per second of training found by benchmarks/frontier.py
    # on this class of 2-core CPU (see benchmarks/RESULTS.md): fastnet trained as
    # airbench94_muon trains its net (Muon, linear decay to zero). Epochs scale with the data.
    "fast": dict(drop_last=True),
    # Nesterov SGD with warm-up and BatchNorm biases at 64× the lr: the default before Muon
    # (which also had fastnet at 32/128/128 on the CPU).
    "fast-sgd": dict(optimizer="sgd", weight_decay=1.3e-3, warmup=0.23, lr_floor=0.07),
    # torchvision models (the default for tv:NAME): AdamW at a fine-tuning lr, warm-up then
    # cosine decay, no BatchNorm-bias boost (their new head starts at zero, models/tv.py).
    # The fast recipe's SGD at lr 0.2 is tuned for fastnet and makes a ResNet-18 diverge;
    # lr and warm-up measured on hymenoptera (benchmarks/RESULTS.md, section 6).
    # (its 10 epochs are filled in with the data: a small data set from pretrained weights
    # gets a linear probe instead, see PROBE_BELOW)
    "finetune": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, batch_size=32,
                     schedule="onecycle", warmup=0.1, label_smoothing=0.1,
                     norm_bias_lr_mult=1.0, flip="random", translate=0, cutout=0, tta=1,
                     ema=0.0),
}

DEFAULT_RECIPE = "fast"

# The fast recipes: their batch sizes per device type, their epochs at 4,000 training
# images, more for less data and fewer for more, and what they add to an augmentation
# preset on colour images (measured: benchmarks/RESULTS.md). Other recipes name a batch
# size or take 128. fast's colour jitter on small colour images: +0.40 ± 0.18 points on the
# CIFAR subset's dev split at no cost in time, 18 seeds, as the CIFAR-10 record after
# airbench94_muon found brightness and contrast jitter to pay on all of CIFAR-10; on the
# grey 8×8 digits it gave -0.3 ± 0.2 (section 23's seventh pass), so grey images go without.
FAST = {"fast": dict(batch={"cpu": 256, "cuda": 1024}, epochs=16,
                     colour_augment={"cifar": dict(jitter=0.15)}),
        "fast-sgd": dict(batch={"cpu": 128, "cuda": 1024}, epochs=20)}


def default_recipe(model: str | None) -> str:
    """The recipe used when none is named: the one the model's family is registered with
    (finetune for torchvision models)."""
    return model_entry(model).recipe if model else DEFAULT_RECIPE


# Augmentation presets (--augment): what each sets where the user gave no value.
# Measured on hymenoptera (benchmarks/photos.py, RESULTS section 13).
AUGMENT = {
    "cifar": dict(crop_scale=1.0, rotate=0.0, jitter=0.0),
    "photo": dict(crop_scale=0.35, rotate=10.0, jitter=0.2, translate=0, cutout=0),
    "none": dict(crop_scale=1.0, rotate=0.0, jitter=0.0, translate=0, cutout=0, flip="none"),
}


# Below this many training images, pretrained weights get a linear probe by default: on
# hymenoptera's 245 photos, a probe of EfficientNet-Lite0's ImageNet features beat every
# fine-tuning schedule tried, by 1.6 points (3-fold CV on its train/ folder,
# benchmarks/RESULTS.md section 18). Larger data sets keep the fine-tuning schedule.
PROBE_BELOW = 1000

# A probe reads images at about 1.6× the size its weights were trained at, unless
# --image-size is given. A network trained on RandomResizedCrop sees objects larger in
# training than in a whole image of the same size (Touvron et al. 2019, "FixRes"; timm's
# `test_input_size`); its frozen features fit best from larger inputs. On hymenoptera
# (EfficientNet-Lite0, 3-fold CV on train/ only) the probe's CV accuracy rose from 224 px to
# a peak at 352-384 px (benchmarks/RESULTS.md section 18).
PROBE_SCALE = 1.6


def probe_image_size(weights_size: int, scale: float = PROBE_SCALE) -> int:
    """The image size a linear probe of weights trained at `weights_size` px reads, a
    multiple of 32 (352 for 224)."""
    return 32 * max(1, round(scale * weights_size / 32))


def fill_recipe_defaults(cfg: Config, num_train: int, device_type: str,
                         image_size: tuple[int, int] = (32, 32),
                         pretrained: bool = False, channels: int = 3) -> Config:
    """Settings a recipe leaves to the data and the machine, filled in where the user gave
    none: the number of epochs grows as the data set shrinks (each pass holds fewer steps),
    a model may have widths of its own per device type (fastnet's are narrower on the
    CPU), the augmentation preset follows the image size (and the fast recipe's colour
    jitter the `channels`), and `pretrained` weights (a model family's, not a cnnkit run's)
    are probed on a small data set, else fine-tuned after a frozen epoch."""
    changes = {}
    if cfg.linear_probe is None:
        changes["linear_probe"] = bool(
            pretrained and cfg.recipe == "finetune" and num_train < PROBE_BELOW and
            cfg.epochs is None and cfg.freeze_epochs is None and not cfg.multi_label)
    probe = changes.get("linear_probe", cfg.linear_probe)
    if probe and cfg.epochs is None:
        changes["epochs"] = 1  # a probe is one pass
    preset = cfg.augment or ("photo" if min(image_size) >= 64 else "cifar")
    changes["augment"] = preset
    recipe_adds = FAST.get(cfg.recipe, {}).get("colour_augment", {}).get(preset, {}) \
        if channels == 3 else {}
    for name, value in {**AUGMENT[preset], **recipe_adds}.items():
        if name in ("crop_scale", "rotate", "jitter"):
            if getattr(cfg, name) is None:
                changes[name] = value
        else:  # the preset replaces the recipe's shifts, cutout (and, for none, flips)
            changes[name] = value
    if cfg.epochs is None and not probe:
        if cfg.recipe in FAST:
            base = FAST[cfg.recipe]["epochs"]
            changes["epochs"] = int(round(min(2 * base, max(base / 2, base * (
                4000 / max(num_train, 1)) ** 0.4))))
        else:
            changes["epochs"] = 10
    if cfg.batch_size is None:
        batch = FAST.get(cfg.recipe, {}).get("batch", {}).get(device_type, 128)
        if cfg.recipe in FAST:
            # A small data set gets about 8 steps an epoch: on hymenoptera's 245 photos
            # batch 32 beat 256 by 4 points (benchmarks/RESULTS.md section 13). A mid-sized
            # one gets about 16, as the CPU's 256 gives 4,000 images: on an H200 the GPU's
            # 1024 (4 steps an epoch) lost 6.6 points to 256 on the CIFAR subset (3 seeds,
            # section 19). 50,000 images keep 1024.
            steps, smallest = (8, 32) if num_train < 2048 else (16, 256)
            batch = min(batch, max(smallest, 2 ** round(math.log2(max(num_train, 1) / steps))))
        changes["batch_size"] = batch
    batch = changes.get("batch_size", cfg.batch_size)
    if cfg.lr is None:
        changes["lr"] = {"adamw": 0.002, "muon": 0.24}.get(cfg.optimizer, 0.2 * batch / 128)
    if cfg.sgd_lr is None and cfg.optimizer == "muon":
        changes["sgd_lr"] = 0.053 * batch
    if cfg.width is None:
        changes["width"] = model_entry(cfg.model).default_width(device_type)
    if cfg.eval_every is None:
        # An evaluation of the validation split costs about a tenth of a fast epoch on the
        # CPU (a fifth of the images, a forward pass each), and the fast recipes' lr decays
        # to zero, so their last epoch is the one that counts: four evaluations a run, not
        # sixteen (benchmarks/RESULTS.md section 23). --patience watches every epoch.
        epochs = changes.get("epochs", cfg.epochs) or 1
        changes["eval_every"] = max(1, epochs // 4) \
            if cfg.recipe in FAST and not cfg.patience else 1
    if cfg.freeze_epochs is None:
        # fine-tuning pretrained weights: the new head first, on a frozen backbone
        changes["freeze_epochs"] = int(cfg.recipe == "finetune" and pretrained and not probe)
    if cfg.freeze_bn is None:
        changes["freeze_bn"] = False
    return dataclasses.replace(cfg, **changes)


def make_config(recipe: str | None = None, **overrides: Any) -> Config:
    """Config = dataclass defaults, then the recipe's settings, then explicit overrides."""
    recipe = recipe or overrides.pop("recipe", None) or default_recipe(overrides.get("model"))
    overrides.pop("recipe", None)
    if recipe not in RECIPES:
        raise unknown_choice("recipe", recipe, RECIPES)
    unknown = set(overrides) - set(field_names())
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(sorted(unknown))}; "
                          f"valid settings: {', '.join(field_names())}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("linear_probe") and overrides.get("epochs") is None:
        values["epochs"] = 1  # a probe is one pass: the recipe's epochs do not apply
    cfg = Config(recipe=recipe, **values)
    validate(cfg)
    check_for_model(cfg)
    return cfg


def check_for_model(cfg: Config) -> None:
    """Settings that only some model families take."""
    if (cfg.pretrained or cfg.freeze_epochs or cfg.linear_probe or cfg.freeze_bn) and \
            model_entry(cfg.model).pretrained_info is None:
        raise SettingsError("--pretrained, --freeze-epochs, --freeze-bn and --linear-probe are for "
                            "torchvision and timm models: --model tv:NAME or timm:NAME "
                            "(e.g. tv:resnet18)")

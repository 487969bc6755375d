"""One dataclass holds every training setting; a recipe is a named set of overrides.

The resolved Config is saved as config.json with every run, so a run can always be
explained and repeated. The CLI builds its `train` flags from these fields.
"""
from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingsError, first_line, unknown_choice
from .models import model_entry


def _f(default: Any, help: str, group: str, **kw) -> Any:
    """A setting: its default, its help, its group of `--help` (one of GROUPS), and any
    choices."""
    return field(default=default, metadata={"help": help, "group": group, **kw})


# The groups of `cnnkit train --help`, in order.
GROUPS = {"data": "what to train on", "model": "the model and where its weights start",
          "training": "optimization and schedule (defaults are the fast recipe's: "
                      "--recipe changes them, see `cnnkit recipes`)",
          "augmentation": "the input pipeline", "evaluation": "during training and after",
          "output": "the run folder", "distributed": "several processes (torchrun / --nproc)"}


@dataclass
class Config:
    # --- what to train on -------------------------------------------------------
    data: str = _f("cifar10", "cifar10, cifar100, mnist, fashion-mnist, digits, or a PATH "
                   "(cifar-10-batches-py / cifar-100-python folder, an image folder, or a CSV "
                   "of path,label rows)",
                   group="data", metavar="NAME_OR_PATH")
    data_dir: str | None = _f(None, "download cache (default $CNNKIT_DATA or ~/.cache/cnnkit)",
                              group="data", metavar="DIR")
    image_size: int | None = _f(None, "resize images to SIZE×SIZE (default: the data set's "
                                "own size; 32 for image folders)", group="data")
    val_fraction: float | None = _f(None, "hold out this fraction of train for validation "
                                    "(default: the test split if there is one, else 0.2)",
                                    group="data")
    channels: int | None = _f(None, "1 (greyscale) or 3 (RGB): convert every image to it "
                              "(default: RGB for image folders and CSVs, a built-in data "
                              "set's own)", choices=[1, 3], group="data")
    strict: bool = _f(False, "unreadable images in a folder are an error, not a warning",
                      group="data")
    # Resolved from the data when a run starts (a CSV with '|' in a label cell is
    # multi-label without the flag), so a saved run's config says which it is.
    multi_label: bool = _f(False, "each image has a set of labels (a CSV's label cells "
                           "hold them separated by '|', e.g. cat|outdoor; such a CSV is "
                           "multi-label without this flag): sigmoid outputs, binary "
                           "cross-entropy, a threshold per label", group="data")
    stream: bool = _f(False, "decode image files in DataLoader workers during training "
                      "instead of holding them decoded in memory", group="data")
    max_memory: float | None = _f(None, "GB of decoded images to hold in memory; beyond it "
                                  "image files are streamed (default: a quarter of RAM)",
                                  group="data")
    # --- the model --------------------------------------------------------------
    model: str = _f("fastnet", "model name (see `cnnkit models`)", group="model",
                   metavar="NAME")
    width: str | None = _f(None, "layer widths, comma-separated (fastnet: 3 block widths, "
                           "resnet9: 4, resnet18: 1 base width); default: the model's own",
                           group="model", metavar="W,W,...")
    weights: str | None = _f(None, "start from these weights: a cnnkit checkpoint (.pt) or "
                             ".safetensors file for the same model and classes", group="model",
                             metavar="FILE")
    pretrained: bool = _f(False, "tv: and timm: models: start from the library's pretrained "
                          "weights (downloaded once; image size and normalization follow "
                          "them)",
                          group="model")
    freeze_epochs: int | None = _f(None, "tv: and timm: models: train only the new head for "
                                   "this many epochs, backbone and its BatchNorm statistics "
                                   "frozen (default: 1 when starting from pretrained weights "
                                   "with the finetune recipe, as fastai's fine_tune; else 0)",
                                   group="model")
    linear_probe: bool = _f(False, "tv: and timm: models: fit only the new head, as a "
                            "logistic regression (scikit-learn) on the backbone's features "
                            "of every training image, computed once without augmentation: "
                            "one 'epoch' of seconds; fine-tune after it with --weights "
                            "RUN/best.pt", group="model")
    backbone_lr_mult: float = _f(0.1, "lr multiplier of a pretrained or once-frozen "
                                 "backbone", group="training")
    balance: bool = _f(False, "weight the loss by inverse class frequency", group="training")
    # --- optimisation -----------------------------------------------------------
    drop_last: bool = _f(False, "drop each epoch's last, smaller batch (the fast recipe: "
                         "every step costs the same)", group="training")
    epochs: int | None = _f(None, "passes over the training set (default: the recipe's, "
                            "scaled to the data set's size)", group="training")
    time_budget: float | None = _f(None, "fit the schedule to this many seconds of training, "
                                   "planned from a measured step time", group="training")
    batch_size: int | None = _f(None, "images per optimizer step, over all processes under "
                                "DDP (default: the recipe's; fast: 256 on the CPU, 1024 on a "
                                "GPU)", group="training")
    optimizer: str = _f("muon", "sgd, adamw, or muon (Muon for the hidden weights, Nesterov "
                        "SGD for the rest)", choices=["sgd", "adamw", "muon"],
                        group="training")
    lr: float | None = _f(None, "peak learning rate of the mean batch loss (default: Muon "
                          "0.24, SGD 0.2 × batch/128, AdamW 0.002)", group="training")
    momentum: float = _f(0.85, "SGD momentum", group="training")
    nesterov: bool = _f(True, "use Nesterov momentum with SGD", group="training")
    weight_decay: float = _f(0.0, "weight decay of conv and linear weights (not biases, "
                             "not norms; with Muon, of the classifier only: Muon keeps each "
                             "weight's norm fixed)", group="training")
    norm_bias_lr_mult: float = _f(64.0, "lr multiplier for BatchNorm biases", group="training")
    muon_momentum: float = _f(0.6, "--optimizer muon: momentum of the Muon updates",
                              group="training")
    sgd_lr: float | None = _f(None, "--optimizer muon: peak lr of what Muon does not train "
                              "(biases, BatchNorm), of the mean loss (default: 0.053 × the "
                              "batch size, airbench94_muon's lr of the summed loss)",
                              group="training")
    # airbench94_muon's head has 12.6 × the bias lr and divides its logits by the width;
    # fastnet multiplies them by 1/9, which is (128/9)² ≈ 200× the lr: 12.6 / 200.
    head_lr_mult: float = _f(0.0625, "--optimizer muon: the classifier's lr as a multiple "
                             "of --sgd-lr", group="training")
    whiten_bias_epochs: int = _f(3, "epochs during which the whitening conv's bias trains "
                                 "(fastnet), then it is frozen", group="training")
    schedule: str = _f("linear", "lr schedule, stepped per batch: constant, onecycle "
                       "(warm-up, cosine to 0), linear (warm-up, linear decay to --lr-floor)",
                       choices=["constant", "onecycle", "linear"], group="training")
    warmup: float = _f(0.0, "fraction of steps spent warming up (onecycle, linear)",
                       group="training")
    lr_floor: float = _f(0.0, "final lr of the linear schedule, as a fraction of the peak",
                         group="training")
    label_smoothing: float = _f(0.2, "cross-entropy label smoothing (single-label only: "
                                "--multi-label trains on the 0/1 targets as given)",
                                group="training")
    ema: float = _f(0.0, "decay of an exponential moving average of the weights, updated "
                    "every 5 steps and used for evaluation (0: off)", group="training")
    patience: int | None = _f(None, "stop when val accuracy has not improved for N epochs "
                              "(off by default: the recipes decay the lr over a fixed number "
                              "of steps, and stopping early cuts that decay short)",
                              group="training")
    # --- input pipeline ---------------------------------------------------------
    normalize: bool = _f(True, "subtract the training set's per-channel mean and divide by "
                         "its std (off: pixels scaled to [0, 1] only)", group="augmentation")
    flip: str = _f("alternate", "horizontal flip augmentation: none, random, alternate "
                   "(each image flipped every other epoch)",
                   choices=["none", "random", "alternate"], group="augmentation")
    translate: int = _f(2, "random translation by up to PX pixels (reflect padding)",
                        group="augmentation")
    cutout: int = _f(0, "cut out a random PX×PX square from each image (0: off)",
                     group="augmentation")
    augment: str | None = _f(None, "augmentation preset: cifar (the recipe's flips, shifts "
                             "and cutout), photo (random-resized crops, ±10° rotation, "
                             "colour jitter, flips), none; default: photo for images of "
                             "64 pixels or more, else cifar",
                             choices=["cifar", "photo", "none"], group="augmentation")
    crop_scale: float | None = _f(None, "random-resized crop: the smallest fraction of the "
                                  "image's area a crop takes (1: off; the photo preset: "
                                  "0.35)", group="augmentation", metavar="FRACTION")
    rotate: float | None = _f(None, "random rotation by up to DEG degrees (the photo "
                              "preset: 10)", group="augmentation", metavar="DEG")
    jitter: float | None = _f(None, "brightness, contrast and saturation each × (1 ± J) "
                              "(the photo preset: 0.2)", group="augmentation", metavar="J")
    tta: int = _f(2, "test-time augmentation when evaluating: 0 none, 1 flip, "
                  "2 flip and 1-pixel translations", choices=[0, 1, 2], group="evaluation")
    compile: bool = _f(False, "torch.compile the model (CUDA)", group="training")
    amp: str = _f("auto", "mixed precision: auto is bf16 on GPUs that have it, fp16 with "
                  "loss scaling on older ones (T4, V100), float32 on the CPU; off is float32",
                  choices=["auto", "bf16", "fp16", "off"], group="training")
    # --- several processes (torchrun / --nproc) -----------------------------------
    sync_bn: bool = _f(False, "DDP on GPUs: BatchNorm statistics over the whole global batch "
                       "(SyncBatchNorm) instead of each process's share", group="distributed")
    dist_timeout: float = _f(300.0, "DDP: seconds a process waits for the others before the "
                             "job fails (a dead or hung machine)", group="distributed")
    # --- bookkeeping ------------------------------------------------------------
    seed: int = _f(0, "random seed; on the CPU the same seed gives the same run",
                   group="training")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N", group="training", metavar="DEVICE")
    eval_batch_size: int = _f(500, "images per batch when evaluating", group="evaluation")
    tensorboard: bool = _f(False, "also write TensorBoard logs into the run folder "
                           "(needs the tensorboard package)", group="output")
    out: str | None = _f(None, "run folder (default runs/<data>-<model>[-N]); never overwritten",
                         group="output", metavar="DIR")
    recipe: str = _f("fast", "named set of defaults (see `cnnkit recipes`; default: fast, or "
                     "finetune for tv: and timm: models)", group="training", metavar="NAME")

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
    "finetune": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, batch_size=32, epochs=10,
                     schedule="onecycle", warmup=0.1, label_smoothing=0.1,
                     norm_bias_lr_mult=1.0, flip="random", translate=0, cutout=0, tta=1,
                     ema=0.0),
}

DEFAULT_RECIPE = "fast"

# The fast recipes: their batch sizes per device type, and their epochs at 4,000 training
# images, more for less data and fewer for more (measured: benchmarks/RESULTS.md). Other
# recipes name a batch size or take 128.
FAST = {"fast": dict(batch={"cpu": 256, "cuda": 1024}, epochs=16),
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


def fill_recipe_defaults(cfg: Config, num_train: int, device_type: str,
                         image_size: tuple[int, int] = (32, 32)) -> Config:
    """Settings a recipe leaves to the data and the machine, filled in where the user gave
    none: the number of epochs grows as the data set shrinks (each pass holds fewer steps),
    a model may have widths of its own per device type (fastnet's are narrower on the
    CPU), and the augmentation preset follows the image size."""
    changes = {}
    preset = cfg.augment or ("photo" if min(image_size) >= 64 else "cifar")
    changes["augment"] = preset
    for name, value in AUGMENT[preset].items():
        if name in ("crop_scale", "rotate", "jitter"):
            if getattr(cfg, name) is None:
                changes[name] = value
        else:  # the preset replaces the recipe's shifts, cutout (and, for none, flips)
            changes[name] = value
    if cfg.epochs is None:
        if cfg.recipe in FAST:
            base = FAST[cfg.recipe]["epochs"]
            changes["epochs"] = int(round(min(2 * base, max(base / 2, base * (
                4000 / max(num_train, 1)) ** 0.4))))
        else:
            changes["epochs"] = 10
    if cfg.batch_size is None:
        batch = FAST.get(cfg.recipe, {}).get("batch", {}).get(device_type, 128)
        if cfg.recipe in FAST and num_train < 2048:
            # A small data set gets about 8 steps an epoch: on hymenoptera's 245 photos
            # batch 32 beat 256 by 4 points (benchmarks/RESULTS.md section 13)
            batch = min(batch, max(32, 2 ** round(math.log2(max(num_train, 1) / 8))))
        changes["batch_size"] = batch
    batch = changes.get("batch_size", cfg.batch_size)
    if cfg.lr is None:
        changes["lr"] = {"adamw": 0.002, "muon": 0.24}.get(cfg.optimizer, 0.2 * batch / 128)
    if cfg.sgd_lr is None and cfg.optimizer == "muon":
        changes["sgd_lr"] = 0.053 * batch
    if cfg.width is None:
        changes["width"] = model_entry(cfg.model).default_width(device_type, cfg.time_budget)
    if cfg.freeze_epochs is None:
        # fine-tuning pretrained weights: the new head first, on a frozen backbone
        changes["freeze_epochs"] = int(cfg.recipe == "finetune" and bool(
            cfg.pretrained or cfg.weights) and not cfg.linear_probe and
            model_entry(cfg.model).pretrained_info is not None)
    return dataclasses.replace(cfg, **changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


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
    return cfg


def validate(cfg: Config) -> None:
    for name in ("epochs", "batch_size", "eval_batch_size", "translate", "cutout",
                 "freeze_epochs", "patience"):
        low = 0 if name in ("translate", "cutout", "freeze_epochs") else 1
        if getattr(cfg, name) is not None and getattr(cfg, name) < low:
            raise SettingsError(f"--{name.replace('_', '-')} must be at least {low}, "
                              f"got {getattr(cfg, name)}")
    for name in ("lr", "sgd_lr"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise SettingsError(f"--{name.replace('_', '-')} must be positive, got "
                                f"{getattr(cfg, name)}")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise SettingsError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.dist_timeout <= 0:
        raise SettingsError(f"--dist-timeout must be positive seconds, got {cfg.dist_timeout}")
    if cfg.time_budget is not None and cfg.time_budget <= 0:
        raise SettingsError(f"--time-budget must be positive seconds, got {cfg.time_budget}")
    if cfg.width is not None:
        parse_widths(cfg.width)
    if cfg.linear_probe and cfg.epochs not in (None, 1):
        raise SettingsError("--linear-probe fits the head once: drop --epochs (to fine-tune "
                            "after it, train again with --weights RUN/best.pt)")
    if (cfg.pretrained or cfg.freeze_epochs or cfg.linear_probe) and \
            model_entry(cfg.model).pretrained_info is None:
        raise SettingsError("--pretrained, --freeze-epochs and --linear-probe are for "
                            "torchvision and timm models: --model tv:NAME or timm:NAME "
                            "(e.g. tv:resnet18)")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise SettingsError(f"--image-size must be positive, got {cfg.image_size}")
    for f in dataclasses.fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) is not None and getattr(cfg, f.name) not in choices:
            raise unknown_choice(f"--{f.name.replace('_', '-')}", getattr(cfg, f.name), choices)


def parse_widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in str(text).split(","))
    except ValueError:
        raise SettingsError(f"--width takes comma-separated integers like 64,256,256; "
                          f"got {text!r}") from None
    if not widths or min(widths) < 1:
        raise SettingsError(f"--width values must be positive, got {text!r}")
    return widths


def settings_from_file(path: str) -> dict:
    """The Config fields in a JSON or YAML file (.yaml, .yml): a run's config.json (which
    repeats that run: its data from where it really is, its resolved settings) or a file of
    chosen settings. `out` is left out, so a repeat gets a run folder of its own."""
    kind = "YAML" if str(path).lower().endswith((".yaml", ".yml")) else "JSON"
    import yaml  # only here: `import cnnkit` stays light
    try:
        with open(path, encoding="utf-8") as f:
            # safe_load: plain data only, a YAML file cannot run code
            saved = yaml.safe_load(f) if kind == "YAML" else json.load(f)
    except FileNotFoundError:
        raise SettingsError(f"--config {path}: no such file") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SettingsError(f"--config {path}: not a readable {kind} file ({first_line(e)})"
                            ) from None
    if not isinstance(saved, dict):
        raise SettingsError(f"--config {path}: expected a {kind} mapping of settings, like "
                            "'epochs: 10'")
    fields = set(field_names())
    unknown = sorted(k for k in saved if k not in fields) if "data_source" not in saved else []
    if unknown:
        raise SettingsError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; "
                            f"valid settings: {', '.join(sorted(fields))}")
    settings = {k: v for k, v in saved.items() if k in fields and k != "out"}
    if saved.get("data_source"):  # a run's config.json: its data wherever this runs from
        settings["data"] = saved["data_source"]
    return settings

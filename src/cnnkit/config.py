"""One dataclass holds every training setting (recipes.py names sets of them).

The resolved Config is saved as config.json with every run, so a run can always be
explained and repeated. The CLI builds its `train` flags from these fields. This module
knows no model: models/ may name Config, and recipes.py joins the two.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingsError, first_line, unknown_choice


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
                                "own size, 32 for image folders; pretrained weights' own "
                                "size, 1.6× it for a linear probe of them)", group="data")
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
                             ".safetensors file for the same model and classes, or for tv: "
                             "and timm: models their library's state_dict (timm's "
                             "EfficientNets also EfficientNet-PyTorch's)", group="model",
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
    freeze_bn: bool | None = _f(None, "tv: and timm: models: keep a pretrained backbone's "
                                "BatchNorm statistics as they are while it fine-tunes (its "
                                "affine weights still train) (default: on when fine-tuning "
                                "pretrained weights with the finetune recipe)", group="model")
    linear_probe: bool | None = _f(None, "tv: and timm: models: fit only the new head, as "
                                   "a logistic regression (scikit-learn) on the backbone's "
                                   "features of every training image, computed once without "
                                   "augmentation: one 'epoch' of seconds; fine-tune after it "
                                   "with --weights RUN/best.pt (default: on for pretrained "
                                   "weights and under 1,000 training images with the finetune "
                                   "recipe, when no number of epochs is given)",
                                   group="model")
    backbone_lr_mult: float = _f(0.1, "lr multiplier of a pretrained or once-frozen "
                                 "backbone", group="training")
    balance: bool = _f(False, "weight the loss by inverse class frequency", group="training")
    # --- optimisation -----------------------------------------------------------
    drop_last: bool = _f(False, "drop each epoch's last, smaller batch (the fast recipe: "
                         "every step costs the same)", group="training")
    epochs: int | None = _f(None, "passes over the training set (default: the recipe's, "
                            "scaled to the data set's size)", group="training")
    time_budget: float | None = _f(None, "fit the run to this many seconds of the whole "
                                   "command (start-up, data, evaluations, report included), "
                                   "planned from a measured step time and re-planned after "
                                   "each epoch", group="training")
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
    augment: str | None = _f(None, "augmentation preset: cifar (the recipe's flips, shifts, "
                             "cutout and colour jitter), photo (random-resized crops, ±10° "
                             "rotation, colour jitter, flips), none; default: photo for "
                             "images of 64 pixels or more, else cifar",
                             choices=["cifar", "photo", "none"], group="augmentation")
    crop_scale: float | None = _f(None, "random-resized crop: the smallest fraction of the "
                                  "image's area a crop takes (1: off; the photo preset: "
                                  "0.35)", group="augmentation", metavar="FRACTION")
    rotate: float | None = _f(None, "random rotation by up to DEG degrees (the photo "
                              "preset: 10)", group="augmentation", metavar="DEG")
    jitter: float | None = _f(None, "brightness, contrast and saturation each × (1 ± J) "
                              "(the photo preset: 0.2; the fast recipe on small colour "
                              "images: 0.15)", group="augmentation", metavar="J")
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
    eval_every: int | None = _f(None, "evaluate on the validation split after every N "
                                "epochs, and always after the last (default: every epoch; "
                                "the fast recipes, whose lr decays to the end, every quarter "
                                "of the run, unless --patience is given)", group="evaluation")
    tensorboard: bool = _f(False, "also write TensorBoard logs into the run folder "
                           "(needs the tensorboard package)", group="output")
    plots: bool = _f(True, "draw the report's pictures when training ends (curves, confusion "
                     "matrix, top losses, filters, Grad-CAM: seconds of matplotlib); with "
                     "--no-plots report.html and evaluation.json come without them, and "
                     "`cnnkit eval RUN --out DIR` draws them later", group="output")
    out: str | None = _f(None, "run folder (default runs/<data>-<model>[-N]); never overwritten",
                         group="output", metavar="DIR")
    recipe: str = _f("fast", "named set of defaults (see `cnnkit recipes`; default: fast, or "
                     "finetune for tv: and timm: models)", group="training", metavar="NAME")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def validate(cfg: Config) -> None:
    """Each setting on its own terms (recipes.check_for_model asks the model's family)."""
    for name in ("epochs", "batch_size", "eval_batch_size", "translate", "cutout",
                 "freeze_epochs", "patience", "eval_every"):
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

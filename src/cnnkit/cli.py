"""The `cnnkit` command: builds a parser and calls the Python API, nothing more."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

from .version import __version__
from .config import GROUPS, Config, settings_from_file
from .device import keep_freed_memory
from .distributed import from_env, quiet_unless_main
from .errors import CnnkitError, Interrupted, SettingsError, one_line_warnings
from .recipes import DEFAULT_RECIPE, RECIPES, make_config


def _config_flags(parser: argparse.ArgumentParser, skip=()) -> dict[str, argparse._ArgumentGroup]:
    """One flag per Config field, in the Config's groups; returns the groups, so a verb can
    add its own flags to them. Defaults are None so only what the user typed overrides the
    recipe; the help shows the dataclass default where its text does not say it already."""
    groups = {name: parser.add_argument_group(f"{name}: {title}") for name, title in GROUPS.items()}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.default not in (None, False) and "default" not in help_:
            help_ += f" (default: {'on' if f.default is True else f.default})"
        group = groups[f.metadata["group"]]
        if f.type in ("bool", bool, "bool | None"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=help_)
        else:
            kind = {"int": int, "float": float, "int | None": int,
                    "float | None": float}.get(str(f.type), str)
            # Choices are shown, not enforced here: make_config's check says "did you mean"
            # in one line, where argparse would print its usage too.
            choices = f.metadata.get("choices")
            group.add_argument(flag, type=kind, default=None, help=help_, metavar=(
                "{" + ",".join(map(str, choices)) + "}" if choices else
                f.metadata.get("metavar", _METAVARS.get(kind, "TEXT"))))
    return groups


_METAVARS = {int: "N", float: "X"}
DEVICE_HELP = "auto (default: CUDA if present), cpu, cuda or cuda:N"

# Example commands shown under each verb's --help.
EXAMPLES = {
    "train": """\
  cnnkit train --data cifar10                       the default (fast) recipe
  cnnkit train --data photos/ --image-size 96       your folders: photos/<class>/*.jpg
  cnnkit train --data photos/ --model tv:resnet18 --pretrained   transfer learning
  cnnkit train --recipe tutorial                    the PyTorch tutorial, exactly
  cnnkit train --config runs/cifar10-fastnet/config.json        repeat a run
  cnnkit train --resume runs/cifar10-fastnet        continue an interrupted run""",
    "demo": """\
  cnnkit demo                     CIFAR-10 (downloaded once), or digits offline
  cnnkit demo --data digits       scikit-learn's bundled digits: works offline
  cnnkit demo --data photos/ --epochs 5
  cnnkit demo --data mnist --model resnet9""",
    "eval": """\
  cnnkit eval runs/cifar10-fastnet                  the run's own validation/test split
  cnnkit eval runs/cifar10-fastnet --split train    how well it fits its training images
  cnnkit eval runs/photos-fastnet --data new-photos/ --out report/
  cnnkit eval runs/cifar10-fastnet/best.pt --json""",
    "predict": """\
  cnnkit predict runs/photos-fastnet cat.jpg dog.png
  cnnkit predict runs/photos-fastnet photos/ --recursive --csv predictions.csv
  cnnkit predict runs/photos-fastnet 'photos/*.jpg' --top-k 5
  cnnkit predict model.onnx photos/ --json
  cnnkit predict tv:resnet18 cat.jpg                ImageNet's classes, no training
  cnnkit predict timm:tf_efficientnet_lite0 --weights efficientnet-lite0-57934424.pth cat.jpg""",
    "lr-find": """\
  cnnkit lr-find --data cifar10                     the default recipe's model and data
  cnnkit lr-find --data photos/ --model tv:resnet18 --pretrained --out lr.png
  cnnkit lr-find --data cifar10 --optimizer adamw --steps 200
  cnnkit lr-find --data mnist --recipe tutorial""",
    "export": """\
  cnnkit export runs/cifar10-fastnet --out model.onnx
  cnnkit export runs/cifar10-fastnet --int8 --out model-int8.onnx   int8, measured
  cnnkit export runs/cifar10-fastnet --format torchscript --out model.pt
  cnnkit export runs/cifar10-fastnet --format safetensors --out model.safetensors
  cnnkit predict model.onnx cat.jpg                 use the export""",
    "doctor": """\
  cnnkit doctor photos/                             4 folds of the default recipe
  cnnkit doctor photos/ --time-budget 30 --folds 5  30 seconds per fold
  cnnkit doctor labels.csv --fix                    also write clean.csv without the flagged
  cnnkit train --data runs/doctor-labels/clean.csv  train on it""",
    "tune": """\
  cnnkit tune --data photos/ --trials 20            the default space of the default recipe
  cnnkit tune --data cifar10 --trials 12 --time-budget 20   20 s a trial
  cnnkit tune --data photos/ --model timm:tf_efficientnet_lite0 --weights W.pth
  cnnkit tune --data photos/ --space space.yaml     lr: {low: 0.1, high: 0.5, log: true}
  cnnkit tune --data photos/ --storage sqlite:///shared.db --study s1   one study, many workers
  cnnkit train --data photos/ --config tune/best.yaml                   the best settings""",
    "serve": """\
  cnnkit serve runs/cifar10-fastnet                 http://127.0.0.1:8000
  cnnkit serve model-int8.onnx --port 8080
  cnnkit serve runs/cifar10-fastnet --max-batch 128 --max-wait-ms 5
  cnnkit serve runs/cifar10-fastnet --host 0.0.0.0 --token-file token  other machines too
  cnnkit serve RUN --host 0.0.0.0 --token-file token --tls-cert cert.pem --tls-key key.pem
  cnnkit serve RUN --access-log access.jsonl --max-queue 64 --request-timeout 10
  curl -F files=@cat.jpg http://127.0.0.1:8000/predict""",
}


def _verb(sub, name: str, help: str, description: str | None = None):
    """A subcommand whose --help ends with example commands."""
    examples = EXAMPLES.get(name)
    description = textwrap.fill(description or f"{help[0].upper()}{help[1:]}.",
                                shutil.get_terminal_size().columns - 2)
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"examples:\n{examples}" if examples else None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnnkit", description="Train, evaluate and use CNN "
                                "image classifiers with PyTorch.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _verb(sub, "train", "train a model; prints a table row per epoch",
              "Train a model and save the run in a folder (config.json, metrics.csv, "
              "last.pt, best.pt, report.html). Any flag overrides the recipe's setting.")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last "
                   "completed epoch, with its own settings (and any number of processes)")
    t.add_argument("--config", metavar="FILE", help="take settings from a JSON or YAML file: "
                   "a run's config.json repeats that run (same seed, same data); flags typed "
                   "here win")
    groups = _config_flags(t)
    groups["distributed"].add_argument(
        "--nproc", type=int, metavar="N", help="train with N processes on this machine (DDP: "
        "one per GPU, or sharing the CPU cores); --batch-size stays the global batch. Same "
        "as torchrun --nproc-per-node N -m cnnkit train")
    t.set_defaults(func=cmd_train)

    d = _verb(sub, "demo", "train the default recipe and evaluate it (offline: digits)")
    _config_flags(d)
    d.set_defaults(func=cmd_demo)

    e = _verb(sub, "eval", "accuracy, top-5, per-class precision, recall and F1, and the "
              "confusion matrix")
    e.add_argument("run", help="a run folder or checkpoint file")
    e.add_argument("--data", help="data source to evaluate on (default: the run's own data)")
    e.add_argument("--split", choices=["train", "val", "test", "all"],
                   help="which images: the test split by default when the data has one, "
                   "else the validation split (the run's own, for its own data); all = every "
                   "image once, training images included")
    e.add_argument("--data-dir", metavar="DIR", help="download cache for --data")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="images per forward pass (default 500)")
    e.add_argument("--tta", type=int, choices=[0, 1, 2],
                   help="test-time augmentation level (default: the run's)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--out", metavar="DIR", help="also draw the confusion matrix, per-class accuracy, top "
                   "losses and report.html into this folder")
    e.set_defaults(func=cmd_eval)

    pr = _verb(sub, "predict", "top classes with probabilities for images: files, folders "
               "or glob patterns")
    pr.add_argument("run", help="a run folder, checkpoint, or exported .onnx file; or a "
                    "torchvision or timm model's name (tv:NAME, timm:NAME) to predict "
                    "ImageNet's classes with its pretrained weights")
    pr.add_argument("images", nargs="+", metavar="PATH",
                    help="image files, folders of images, or glob patterns ('photos/*.jpg')")
    pr.add_argument("--recursive", action="store_true",
                    help="also read the images in the folders' subfolders")
    pr.add_argument("--csv", metavar="FILE", help="write one row per image to FILE as it is "
                    "done (predicted class, probabilities, true label from the folder name)")
    pr.add_argument("--top-k", type=int, default=3, metavar="K",
                    help="how many classes to give per image (default 3)")
    pr.add_argument("--batch-size", type=int, default=64, metavar="N",
                    help="images per forward pass (default 64)")
    pr.add_argument("--weights", metavar="FILE", help="with a model's name: a local copy of "
                    "its pretrained weights (as its library saves them) instead of the "
                    "download")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=cmd_predict)

    dr = _verb(sub, "doctor", "find likely label errors, duplicates, train/val leaks and class "
               "imbalance in a data set", "Find likely label errors (confident learning on "
               "out-of-sample predictions of K models, one per fold), exact and near "
               "duplicates and leaks across splits, and class imbalance. Writes findings.csv, "
               "pictures and report.html; never changes the data. Training flags apply to "
               "each fold's run.")
    dr.add_argument("data", metavar="DATA", help="any --data source: a name, a folder, a CSV")
    dr.add_argument("--folds", type=int, default=4, metavar="K",
                    help="models to train, each predicting the images it did not train on "
                    "(default 4)")
    dr.add_argument("--similarity", type=float, metavar="X", help="cosine similarity of "
                    "penultimate features above which two images are near-duplicates "
                    "(default 0.95)")
    dr.add_argument("--fix", action="store_true", help="also write clean.csv: a path,label "
                    "listing of the images not flagged, for cnnkit train --data clean.csv")
    _config_flags(dr, skip=("data", "multi_label"))
    dr.set_defaults(func=cmd_doctor)

    tu = _verb(sub, "tune", "search training settings with Optuna; each trial a run folder",
               "Search training settings with Optuna (TPE sampling, median pruning): each "
               "trial trains on the training split less a held-out fifth and is scored on "
               "that fifth, so the data's validation and test splits stay for the final run. "
               "The study lives in DIR/study.db (run the same command to resume) or in "
               "--storage, shared by any number of workers. Writes DIR/trials/trial-N/, "
               "trials.csv, best.yaml (for train --config) and Optuna's pictures. Training "
               "flags apply to every trial.")
    tu.add_argument("--trials", type=int, default=20, metavar="N",
                    help="trials in the study, counting those done before (default 20)")
    tu.add_argument("--space", metavar="FILE", help="the search space as YAML: 'NAME: {low: "
                    "X, high: Y, log: true}' or 'NAME: [A, B]' per setting (default: one "
                    "that fits the model family and recipe)")
    tu.add_argument("--study", default="cnnkit", metavar="NAME",
                    help="the study's name in the storage (default cnnkit)")
    tu.add_argument("--storage", metavar="URL", help="an Optuna storage URL shared by "
                    "workers, e.g. sqlite:///tune.db or postgresql://host/db (default: "
                    "DIR/study.db)")
    tu.add_argument("--pruner", default="median", choices=["median", "none"],
                    help="stop trials whose accuracy is below the median of earlier trials' "
                    "at the same share of their schedules, from 30%% on (default median)")
    tu.add_argument("--prune-after", type=int, default=4, metavar="N",
                    help="trials that run in full before pruning starts (default 4)")
    _config_flags(tu, skip=("out",))
    tu.add_argument("--out", default="tune", metavar="DIR",
                    help="the tune folder (default ./tune); the same folder resumes")
    tu.set_defaults(func=cmd_tune)

    sb = sub.add_parser("show-batch", help="save a grid of training images with class names")
    sb.add_argument("--data", default="cifar10")
    sb.add_argument("--data-dir")
    sb.add_argument("--image-size", type=int)
    sb.add_argument("--out", default="batch.png")
    sb.add_argument("-n", type=int, default=64, help="how many images (default 64)")
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--augmented", action="store_true",
                    help="show the images after the recipe's training augmentation")
    sb.add_argument("--augment", choices=["cifar", "photo", "none"],
                    help="augmentation preset (default: photo from 64 pixels, else cifar)")
    sb.add_argument("--recipe", help="recipe whose augmentation --augmented shows "
                    "(default: the default recipe)")
    for flag in ("flip", "translate", "cutout"):
        sb.add_argument(f"--{flag}", type=str if flag == "flip" else int,
                        help=f"override the recipe's --{flag}")
    sb.set_defaults(func=cmd_show_batch)

    lf = _verb(sub, "lr-find", "learning-rate range test: plot loss against lr and suggest "
               "an lr")
    # A range test trains ~100 steps of a throw-away copy: no epochs, run folder or evaluation.
    _config_flags(lf, skip=("out", "epochs", "time_budget", "patience", "tensorboard",
                            "sync_bn", "dist_timeout", "tta", "eval_batch_size", "eval_every"))
    lf.add_argument("--out", default="lr-find.png", help="the plot (default lr-find.png)")
    lf.add_argument("--steps", type=int, default=100, metavar="N",
                    help="most steps of the test; it stops early once the loss diverges "
                    "(default 100)")
    lf.set_defaults(func=cmd_lr_find)

    rs = sub.add_parser("runs", help="a table of the runs in a folder")
    rs.add_argument("folder", nargs="?", default="runs")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_runs)

    sv = _verb(sub, "serve", "an HTTP API and a web page for a trained model")
    sv.add_argument("model", metavar="RUN_OR_EXPORT")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine "
                    "only); any other address needs a token or --no-token")
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                    help="largest image accepted (default 10)")
    sv.add_argument("--max-files", type=int, default=64, metavar="N",
                    help="most images in one request (default 64)")
    sv.add_argument("--max-batch", type=int, default=64, metavar="N",
                    help="most images, from concurrent requests, in one forward pass "
                    "(default 64)")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                    help="how long a batch waits for requests still being decoded to join "
                    "it; without other requests in flight it never waits (default 2)")
    sv.add_argument("--max-queue", type=int, metavar="N",
                    help="most images admitted and not yet answered; past it, 503 with "
                    "Retry-After (default: the images that forward passes of --max-batch "
                    "answer in 10 ms, timed at start, and at least a quarter of --max-batch)")
    sv.add_argument("--reject-delay", type=float, default=1.0, metavar="S",
                    help="a request turned away is answered 503 after S seconds, so that "
                    "clients that retry at once cannot keep the server busy turning them "
                    "away (default 1; 0 answers at once)")
    sv.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                    help="a request's headers and body must arrive within S seconds, or its "
                    "connection is closed (default 30)")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                    help="an idle keep-alive connection is closed after S seconds (default 5)")
    sv.add_argument("--token-file", metavar="FILE",
                    help="require 'Authorization: Bearer TOKEN' on /predict, /model and "
                    "/metrics, TOKEN being this file's one line (or $CNNKIT_TOKEN)")
    sv.add_argument("--no-token", action="store_true",
                    help="serve on a non-loopback --host without a token, meaning to")
    sv.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate "
                    "(chain) ...")
    sv.add_argument("--tls-key", metavar="PEM", help="... and its private key")
    sv.add_argument("--access-log", metavar="FILE",
                    help="append one JSON line per request: time, client, route, status, "
                    "images, milliseconds, batch")
    sv.add_argument("--device", default="auto", help=DEVICE_HELP)
    sv.set_defaults(func=cmd_serve)

    su = sub.add_parser("summary", help="per-layer output shapes, parameters and FLOPs")
    su.add_argument("model", metavar="MODEL_OR_RUN")
    su.add_argument("--image-size", type=int)
    su.add_argument("--in-channels", type=int)
    su.add_argument("--num-classes", type=int)
    su.add_argument("--json", action="store_true")
    su.set_defaults(func=cmd_summary)

    fi = sub.add_parser("filters", help="draw a conv layer's learned kernels")
    fi.add_argument("run")
    fi.add_argument("--layer", help="conv layer name (default: the first conv layer)")
    fi.add_argument("--out", required=True, help="the PNG to write")
    fi.set_defaults(func=cmd_filters)

    fe = sub.add_parser("features", help="feature maps of one image after each conv layer")
    fe.add_argument("run")
    fe.add_argument("image")
    fe.add_argument("--layers", nargs="+", metavar="NAME")
    fe.add_argument("--out", required=True, help="folder for one PNG per layer")
    fe.set_defaults(func=cmd_features)

    ex = sub.add_parser("explain", help="Grad-CAM heat maps: where the evidence for a class is")
    ex.add_argument("run")
    ex.add_argument("images", nargs="+", metavar="IMAGE")
    ex.add_argument("--class", dest="class_name", help="explain this class (default: the top one)")
    ex.add_argument("--layer", help="target layer (default: the model's last spatial stage)")
    ex.add_argument("--out", required=True, help="folder for the overlaid images")
    ex.set_defaults(func=cmd_explain)

    cp = sub.add_parser("compare", help="overlay the curves of several runs")
    cp.add_argument("runs", nargs="+", metavar="RUN")
    cp.add_argument("--out", required=True, help="the plot, e.g. compare.png")
    cp.set_defaults(func=cmd_compare)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("--timm", metavar="PATTERN", nargs="?", const="*",
                   help="list timm's models matching PATTERN (e.g. 'resnet*')")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("recipes", help="list the named recipes and their settings")
    r.set_defaults(func=cmd_recipes)

    x = _verb(sub, "export", "write a run's weights in another format")
    x.add_argument("run", help="a run folder or checkpoint file")
    x.add_argument("--format", default="onnx", metavar="{onnx,torchscript,safetensors}",
                   help="onnx (default; written by torch.export) and torchscript (deprecated "
                   "by PyTorch; kept while it ships) take uint8 pixels, include "
                   "normalization and carry the class names; safetensors is the weights")
    x.add_argument("--out", required=True, help="the file to write (never overwritten)")
    x.add_argument("--int8", action="store_true",
                   help="onnx: quantize to int8 with onnxruntime, calibrated on the run's "
                   "training images; refused if validation accuracy drops too far")
    x.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="with --int8: the most validation accuracy, in percentage points, "
                   "that quantization may lose (default 1)")
    x.set_defaults(func=cmd_export)
    return p


def _overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
            if hasattr(args, f.name)}


def cmd_train(args) -> int:
    from .train import train
    keep_freed_memory()
    if args.resume:
        if args.config:
            raise SettingsError("--resume continues a run with its own settings; drop --config")
        train(resume=args.resume, nproc=args.nproc, **_overrides(args))
    else:
        typed = {k: v for k, v in _overrides(args).items() if v is not None}
        settings = typed
        if args.config:  # the file's settings, then what was typed here
            settings = {**settings_from_file(args.config), **typed}
            print(f"settings: {len(settings) - len(typed)} from {args.config}" +
                  (f"; {', '.join('--' + k.replace('_', '-') for k in typed)} from the "
                   "command line" if typed else ""), file=sys.stderr)
        train(make_config(**settings), nproc=args.nproc,
              started=time.perf_counter() - process_age())
    return 0


def process_age() -> float:
    """Seconds since this process started (Linux' /proc; 0 elsewhere): `--time-budget` is
    the whole command's, Python's start and the imports included."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: clock ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def cmd_demo(args) -> int:
    from .demo import demo
    overrides = _overrides(args)
    demo(overrides.pop("data") or "cifar10", **overrides)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, format_report
    result = evaluate(args.run, args.data, split=args.split, device=args.device,
                      batch_size=args.batch_size, data_dir=args.data_dir, tta=args.tta,
                      out=args.out, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def cmd_predict(args) -> int:
    from .predict import accuracy_line, format_predictions, predict
    if args.top_k < 1 or args.batch_size < 1:
        raise SettingsError(f"--top-k and --batch-size must be at least 1, got {args.top_k} "
                            f"and {args.batch_size}")
    if args.csv and Path(args.csv).exists():
        raise SettingsError(f"{args.csv} already exists; cnnkit never overwrites a file: "
                            "pick another --csv")
    results = predict(args.run, args.images, top_k=args.top_k, device=args.device,
                      batch_size=args.batch_size, recursive=args.recursive,
                      csv_path=args.csv, weights=args.weights)
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"cnnkit: error: {r['file']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        print(f"wrote {len(results)} rows to {args.csv} ({len(errors)} unreadable)")
    elif any("predictions" in r for r in results):
        print(format_predictions(results))
    summary = accuracy_line(results)
    if summary and not args.json:
        print(summary)
    return 1 if errors else 0


def cmd_doctor(args) -> int:
    from .doctor import DEFAULT_SIMILARITY, doctor
    keep_freed_memory()
    settings = {k: v for k, v in _overrides(args).items() if v is not None and k not in ("data", "out")}
    doctor(args.data, folds=args.folds, out=args.out, fix=args.fix,
           similarity=args.similarity or DEFAULT_SIMILARITY, **settings)
    return 0


def cmd_tune(args) -> int:
    from .tune import tune
    keep_freed_memory()
    settings = {k: v for k, v in _overrides(args).items() if v is not None and k != "out"}
    tune(args.trials, out=args.out, space=args.space, study=args.study, storage=args.storage,
         pruner=args.pruner, prune_after=args.prune_after, **settings)
    return 0


def cmd_show_batch(args) -> int:
    from .report import show_batch
    cfg = make_config(recipe=args.recipe, flip=args.flip, translate=args.translate,
                      cutout=args.cutout, augment=args.augment) if args.augmented else None
    out = show_batch(args.data, args.out, n=args.n, seed=args.seed, data_dir=args.data_dir,
                     image_size=args.image_size, config=cfg)
    print(f"saved {out}")
    return 0


def cmd_lr_find(args) -> int:
    from .lrfind import lr_find
    settings = {k: v for k, v in _overrides(args).items() if k != "out"}
    result = lr_find(args.out, steps=args.steps, **settings)
    print(f"suggested lr {result['suggested_lr']:.3g} (steepest fall of the loss); "
          f"plot saved to {result['plot']}")
    return 0


def cmd_runs(args) -> int:
    from .runs import format_runs, list_runs
    rows = list_runs(args.folder)
    print(json.dumps(rows, indent=2) if args.json else format_runs(rows))
    return 0


def cmd_serve(args) -> int:
    from .serve import read_token, serve
    for flag in ("max_files", "max_batch", "max_queue"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SettingsError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("max_wait_ms", "reject_delay"):
        if getattr(args, flag) < 0:
            raise SettingsError(f"--{flag.replace('_', '-')} must be 0 or more")
    for flag in ("request_timeout", "keep_alive_timeout"):
        if getattr(args, flag) <= 0:
            raise SettingsError(f"--{flag.replace('_', '-')} must be more than 0 seconds")
    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          device=args.device, max_files=args.max_files, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
          request_timeout=args.request_timeout, keep_alive_timeout=args.keep_alive_timeout,
          token=read_token(args.token_file), no_token=args.no_token, tls_cert=args.tls_cert,
          tls_key=args.tls_key, access_log=args.access_log, reject_delay=args.reject_delay)
    return 0


def cmd_summary(args) -> int:
    from .summary import format_summary, summary
    s = summary(args.model, image_size=args.image_size, in_channels=args.in_channels,
                num_classes=args.num_classes)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_filters(args) -> int:
    from .explain import filters
    r = filters(args.run, args.out, layer=args.layer)
    if r["note"]:
        print(r["note"])
    print(f"saved {r['file']} ({r['layer']}, {'×'.join(map(str, r['shape']))})")
    return 0


def cmd_features(args) -> int:
    from .explain import features
    for r in features(args.run, args.image, args.out, layers=args.layers):
        print(f"{r['layer']}: {r['channels']} channels, {r['height']}×{r['width']} -> {r['file']}")
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    for r in explain(args.run, args.images, args.out, class_name=args.class_name,
                     layer=args.layer):
        print(f"{r['file']}: {r['predicted']} {r['probability']:.3f}; evidence for "
              f"{r['explained']} at {r['layer']} -> {r['heatmap']}")
    return 0


def cmd_compare(args) -> int:
    from .plots import compare_runs
    print(f"saved {compare_runs(args.runs, args.out)}")
    return 0


def cmd_models(args) -> int:
    from .models import list_models, model_entry
    from .models import timm_models, tv
    from .summary import model_stats
    if args.timm is not None:
        found = timm_models.names(args.timm)
        print(json.dumps(found, indent=2) if args.json else "\n".join(found) or
              f"no timm model matches {args.timm!r} (patterns like 'resnet*', '*mobilenet*')")
        return 0 if found else 1
    rows = [{"name": n, "description": model_entry(n).description, **model_stats(n)}
            for n in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14}{'parameters':>12}{'MFLOPs/img':>12}  description   "
          "(at 3×32×32, 10 classes)")
    for r in rows:
        print(f"{r['name']:<14}{r['parameters']:>12,}{r['flops'] / 1e6:>12.1f}  "
              f"{r['description']}")
    print("\ntorchvision models for transfer learning (--model tv:NAME, --pretrained):\n  "
          + " ".join(tv.names()))
    print(f"\ntimm's {len(timm_models.names())} models: --model timm:NAME; list them with "
          "`cnnkit models --timm PATTERN` (e.g. 'resnet*')")
    return 0


def cmd_export(args) -> int:
    from .export import export
    out = export(args.run, args.out, fmt=args.format, int8=args.int8, max_drop=args.max_drop)
    if args.int8:
        from .checkpoint import OnnxModel
        from .export import agreement_name
        r = OnnxModel(out).meta["int8"]
        verified = (f" (int8: validation accuracy {r['int8_accuracy']:.4f} against "
                    f"{r['float_accuracy']:.4f} in float, drop {r['drop_points']:.2f} points, "
                    f"{agreement_name(r)} {r['agreement']:.4f} on {r['images']} images)")
    else:
        verified = "" if args.format == "safetensors" else \
            " (verified against PyTorch on real images: logits within 1e-4)"
    print(f"saved {out}{verified}")
    return 0


def cmd_recipes(args) -> int:
    notes = {DEFAULT_RECIPE: "the default: the Config's own defaults, and these",
             "fast-sgd": "the default before Muon",
             "finetune": "the default for tv: and timm: models"}
    for name, settings in RECIPES.items():
        note = f"  ({notes[name]})" if name in notes else ""
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + note)
    return 0


class _Signals:
    """SIGTERM is turned into KeyboardInterrupt, so training stops the same clean way as on
    Ctrl-C; the exit status still tells which it was (130 or 143)."""
    terminated = False

    @classmethod
    def on_term(cls, signum, frame):
        cls.terminated = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    dist = from_env()  # under torchrun: which process of the job this is
    quiet_unless_main(dist)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _Signals.on_term)
    try:
        return args.func(args)
    except CnnkitError as e:
        # A mistake in the settings, or an error rank 0 reports too, is told once (by rank 0).
        if dist.main:
            print(f"cnnkit: error: {e}", file=sys.stderr)
        elif not (getattr(e, "echo", False) or isinstance(e, SettingsError)):
            print(f"cnnkit: error: rank {dist.rank}: {e}", file=sys.stderr)
        if isinstance(e, Interrupted):
            return 143 if _Signals.terminated else 130
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 143 if _Signals.terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The `cnnkit` command: main(), then out without the interpreter's teardown. Tearing
    down torch's, dynamo's and scikit-learn's modules took ~1 s here after the last line
    (benchmarks/RESULTS.md section 23), and by then every file is written and closed."""
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    os._exit(status)

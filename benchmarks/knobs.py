"""The default recipe with one setting changed at a time, on the dev split of the CIFAR-10
subset (20% of the training images held out, drawn by the seed), several seeds, in this
process: each change's dev accuracy seed by seed and its difference from the default,
paired by seed (frontier.paired). How RESULTS section 23's "Tried" tables are measured.

    python benchmarks/knobs.py --seeds 0 1 2 3 4 5 \
        --try 'e18={"epochs": 18}' 'w36={"width": "36,144,144"}' \
        [--reuse knobs.json ...] [--out knobs.json]

A change is LABEL=JSON, the JSON being keyword arguments of `cnnkit.train`. The default
(label "default") runs first on each seed unless a --reuse file holds it: on the CPU a seed
gives the same run, so saved rows stand for a rerun, and any (label, seed) found in them is
not run again. --out is rewritten after every run, so a stopped sweep keeps its rows; given
the same file as --reuse, it resumes where it stopped. With --out, the table's points are
plotted beside it (.png).

Saved rows stand for the default of their day. `benchmarks/knobs-jitter.json` holds today's
default (colour jitter 0.15 since commit e768892): reuse that one. `benchmarks/knobs.json`
holds the third to seventh passes, whose "default" is the one before (no jitter; today that
is {"jitter": 0.0}), and every change in it was run on that default.

Three changes are not cnnkit settings: "early_crop": [S, K] trains the first K epochs on
random S×S crops of the augmented batches (progressive resizing: those epochs cost about
(S/32)²), "lookahead": true adds the Lookahead of the legacy airbench94 (`lookahead`
below), and "freeze": [[G, E], ...] stops fastnet's conv group G training from epoch E on
(FreezeOut: `freeze_out` below; with "freeze_anneal": true each group's lr also decays to
zero by its epoch, `annealed`). They live here, not in cnnkit, because none paid: RESULTS
section 23.

Training seconds are metrics.csv's, with the freed memory kept as `cnnkit train` keeps it;
the whole command is frontier.py's to time. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import cnnkit  # noqa: E402
import cnnkit.engine  # noqa: E402
import cnnkit.transforms  # noqa: E402
from cnnkit.config import field_names  # noqa: E402
from cnnkit.device import keep_freed_memory  # noqa: E402
from cnnkit.models.fastnet import FastNet  # noqa: E402
from frontier import DEFAULT_DATA, describe, mean, paired  # noqa: E402


def early_crops(size: int, epochs: int, seed: int):
    """Augment.apply wrapped to cut a random size×size window from every image in the first
    `epochs` epochs (the window drawn per image, from a generator of this seed's own)."""
    apply = cnnkit.transforms.Augment.apply
    generator = torch.Generator().manual_seed(1000 + seed)

    def cropped(self, x, index, epoch, draws, seed=0):
        x = apply(self, x, index, epoch, draws, seed)
        if epoch >= epochs or min(x.shape[-2:]) <= size:
            return x
        n = len(x)
        dy, dx = (torch.randint(0, s - size + 1, (n,), generator=generator)
                  for s in x.shape[-2:])
        windows = x.unfold(2, size, 1).unfold(3, size, 1)  # N C H' W' size size
        return windows[torch.arange(n), :, dy, dx]
    return cropped


def lookahead(every: int = 5, base: float = 0.95 ** 5, power: float = 3.0):
    """cnnkit.engine.train_step wrapped with the Lookahead of airbench94 (the legacy,
    SGD record): every `every` steps the weights and BatchNorm statistics move to an
    average of themselves whose decay rises as base × (t/T)^power, and after the last
    step the net takes the average. t and T are the schedule's steps done and planned."""
    train_step = cnnkit.engine.train_step
    average = {}

    def stepped(model, s, *args, **kwargs):
        out = train_step(model, s, *args, **kwargs)
        done, total = s.scheduler.last_epoch, s.scheduler.lr_lambdas[0].total
        if done % every == 0 or done >= total:
            state = model.state_dict()
            if not average:
                average.update({k: v.detach().clone() for k, v in state.items()
                                if v.is_floating_point()})
            decay = 1.0 if done >= total else base * (done / total) ** power
            with torch.no_grad():
                for key, value in average.items():
                    value.lerp_(state[key], 1 - decay)
                    state[key].copy_(value)
        return out
    return stepped


def freeze_out(schedule: list[list[int]], run: dict):
    """FastNet.on_epoch wrapped to freeze conv group G from epoch E on, for each [G, E]
    (FreezeOut, Brock et al. 2017), noting the run's epochs in `run`. Nothing before a
    frozen group trains either (the whitening bias stops after 3 epochs), so its forward
    builds no graph: a step with the first group frozen took 0.77 of the time, with the
    first two 0.46."""
    on_epoch = FastNet.on_epoch

    def frozen(self, epoch, cfg):
        on_epoch(self, epoch, cfg)
        run["epochs"] = cfg.epochs
        for group, start in schedule:
            if epoch >= start:
                self.blocks[group].requires_grad_(False)
    return frozen


def annealed(schedule: list[list[int]], run: dict):
    """cnnkit.engine.train_step wrapped so that each group frozen at epoch E has its own
    linear lr decay, reaching zero at E instead of at the end (FreezeOut's per-layer
    schedule): after each step the group's weights are moved back to
    old + (its lr / the lr) × (new - old). E's share of the schedule's steps is E over the
    run's epochs, which `freeze_out` notes in `run`."""
    train_step = cnnkit.engine.train_step

    def stepped(model, s, *args, **kwargs):
        done, total = s.scheduler.last_epoch, s.scheduler.lr_lambdas[0].total
        kept = []
        for group, start in schedule:
            stop = total * start / run["epochs"]
            if done < stop:
                share = max(0.0, 1 - done / stop) / max(1e-9, 1 - done / total)
                params = [p for p in model.blocks[group].parameters() if p.requires_grad]
                kept.append((share, params, [p.detach().clone() for p in params]))
        out = train_step(model, s, *args, **kwargs)
        with torch.no_grad():
            for share, params, old in kept:
                for p, o in zip(params, old):
                    p.copy_(o.lerp(p, share))
        return out
    return stepped


def run(label: str, overrides: dict, seed: int, data: str) -> dict:
    settings = dict(overrides)
    with contextlib.ExitStack() as patches, tempfile.TemporaryDirectory() as tmp:
        if crop := settings.pop("early_crop", None):
            patches.enter_context(mock.patch.object(cnnkit.transforms.Augment, "apply",
                                                    early_crops(*crop, seed)))
        frozen = {}  # the run's epochs, as the freezing sees them
        if schedule := settings.pop("freeze", None):
            patches.enter_context(mock.patch.object(FastNet, "on_epoch",
                                                    freeze_out(schedule, frozen)))
        if settings.pop("freeze_anneal", False):
            patches.enter_context(mock.patch.object(cnnkit.engine, "train_step",
                                                    annealed(schedule, frozen)))
        if settings.pop("lookahead", False):
            patches.enter_context(mock.patch.object(cnnkit.engine, "train_step", lookahead()))
        result = cnnkit.train(data=data, val_fraction=0.2, seed=seed, out=f"{tmp}/run",
                              plots=False, log=lambda line: None, progress=False, **settings)
    return dict(label=label, seed=seed, overrides=overrides,
                val_acc=result.metrics[-1]["val_acc"], epochs=len(result.metrics),
                train_seconds=sum(m["seconds"] for m in result.metrics))


def parse_change(text: str) -> tuple[str, dict]:
    label, sep, spec = text.partition("=")
    if not sep or not label:
        raise SystemExit(f"--try {text!r}: give LABEL=JSON, e.g. 'e18={{\"epochs\": 18}}'")
    try:
        overrides = json.loads(spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--try {text!r}: its JSON does not parse ({e})")
    if not isinstance(overrides, dict):
        raise SystemExit(f"--try {text!r}: the JSON must be an object of train() settings")
    unknown = set(overrides) - set(field_names()) - {"early_crop", "lookahead", "freeze",
                                                      "freeze_anneal"}
    if unknown:  # found before any run, not after the default's
        raise SystemExit(f"--try {text!r}: unknown setting(s) {', '.join(sorted(unknown))}; "
                         f"see cnnkit.Config")
    crop = overrides.get("early_crop")
    if crop is not None and not (isinstance(crop, list) and len(crop) == 2 and
                                 all(isinstance(v, int) and v > 0 for v in crop)):
        raise SystemExit(f"--try {text!r}: early_crop is [SIZE, EPOCHS], two positive integers")
    freeze = overrides.get("freeze")
    if freeze is not None and not (isinstance(freeze, list) and all(
            isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) and v >= 0
                                                        for v in g) for g in freeze)):
        raise SystemExit(f"--try {text!r}: freeze is [[GROUP, EPOCH], ...], integers from 0")
    if overrides.get("freeze_anneal") and (not freeze or overrides.get("lookahead")):
        raise SystemExit(f"--try {text!r}: freeze_anneal needs freeze, and not lookahead")
    return label, overrides


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--try", dest="changes", nargs="*", default=[], metavar="LABEL=JSON")
    p.add_argument("--reuse", nargs="*", type=Path, default=[],
                   help="saved rows (this script's --out) not to run again")
    p.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = p.parse_args()
    keep_freed_memory()  # as the `cnnkit train` command does: its training seconds

    changes = [("default", {})] + [parse_change(c) for c in args.changes]
    rows = []
    for path in args.reuse:
        if path.is_file():
            rows += json.loads(path.read_text())
        elif path != args.out:  # --reuse F --out F starts F when it is not there yet
            raise SystemExit(f"--reuse {path}: no such file")
    done = {(r["label"], r["seed"]) for r in rows}
    for label, overrides in changes:
        for seed in args.seeds:
            if (label, seed) in done:
                continue
            rows.append(run(label, overrides, seed, args.data))
            done.add((label, seed))
            r = rows[-1]
            print(f"{label} seed {seed}: {100 * r['val_acc']:.2f}% in {r['train_seconds']:.1f} s "
                  f"of training, {r['epochs']} epochs", flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1) + "\n")

    labels = list(dict.fromkeys(["default"] + [r["label"] for r in rows] +
                                [label for label, _ in changes]))
    these = [r for r in rows if r["seed"] in args.seeds]
    print("\n| change | seeds | mean dev acc | per seed | training s (mean) | "
          "minus the default, paired |")
    print("|---|---|---|---|---|---|")
    points = []
    for label in labels:
        mine = sorted((r for r in these if r["label"] == label), key=lambda r: r["seed"])
        if not mine:
            continue
        accs = [100 * r["val_acc"] for r in mine]
        diff = paired(these, label, "default") if label != "default" else None
        seconds = mean(mine, "train_seconds")
        print(f"| {label} | {len(mine)} | {statistics.mean(accs):.2f}% | "
              f"{' / '.join(f'{a:.1f}' for a in accs)} | "
              f"{'-' if seconds is None else f'{seconds:.1f}'} | "
              f"{describe(diff) if diff and len(diff[2]) > 1 else ''} |")
        if seconds is not None:
            # a change stopped early is a mean over fewer seeds: the key says so
            short = f" ({len(mine)} of {len(args.seeds)} seeds)" \
                if len(mine) < len(args.seeds) else ""
            points.append((label + short, seconds, statistics.mean(accs),
                           diff[1] if diff and len(diff[2]) > 1 else 0.0))
    if args.out and points:
        plot(points, args.out.with_suffix(".png"))


def plot(points: list[tuple], path: Path) -> None:
    """Mean dev accuracy against mean training seconds, each change with its paired
    standard error against the default as a bar; points numbered, the key beside them."""
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 6), width_ratios=(3, 2))
    for i, (label, seconds, acc, se) in enumerate(points):
        ax.errorbar(seconds, acc, yerr=se, fmt="o", capsize=3,
                    color="black" if label == "default" else "tab:blue")
        ax.annotate(str(i), (seconds, acc), textcoords="offset points", xytext=(4, 2),
                    fontsize=8)
    ax.set_xlabel("training seconds (mean over seeds)")
    ax.set_ylabel("dev accuracy, % (mean over seeds)")
    ax.set_title("The default recipe, one change at a time\n(bars: standard error of the "
                 "difference from the default, paired by seed)", fontsize=10)
    ax.grid(alpha=0.3)
    key.axis("off")
    key.text(0, 1, "\n".join(f"{i:2d}  {p[0]}" for i, p in enumerate(points)), va="top",
             family="monospace", fontsize=8, transform=key.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

if __name__ == "__main__":
    main()

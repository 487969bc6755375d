"""`cnnkit tune`: an Optuna study over a recipe's settings, every trial a real cnnkit run.

Each trial trains on the data's training split less a held-out fifth (stratified, the same
fifth for every trial) and is scored on that fifth: the data's own validation or test split
never chooses, so `cnnkit train --config DIR/best.yaml` afterwards reports on images the
search did not see. Optuna samples (TPE), prunes (accuracy below the median of the earlier
trials' at the same share of their schedules stops a trial) and stores the study: a SQLite file in
the tune folder by default, so an interrupted tune resumes with the same command; any
Optuna storage URL (--storage) lets several processes or machines share one study.

    DIR/study.db             the study (unless --storage names another)
    DIR/trials/trial-N/      trial N's run folder; its tune.json says complete or pruned
    DIR/trials.csv           a row per trial: state, accuracy, seconds, settings
    DIR/best.yaml            the best trial's settings, for `cnnkit train --config`
    DIR/history.png, DIR/importances.png   Optuna's pictures of the study
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .checkpoint import atomic_write
from .config import Config, field_names
from .data import Dataset, hold_out
from .device import select_runtime
from .errors import CnnkitError, Interrupted, SettingsError, first_line
from .models import model_entry
from .progress import bar, interactive
from .recipes import make_config, probe_image_size
from .setup import load_data, pretrained_form, preflight, prepare
from .train import train

# The share of the training split each trial is scored on.
TUNE_FRACTION = 0.2
# Settings no search varies: where the data comes from and the run goes, the machine's.
NOT_SEARCHED = {"data", "data_dir", "out", "device", "tensorboard", "plots", "dist_timeout",
                "sync_bn", "recipe", "weights", "pretrained", "stream", "max_memory",
                "multi_label", "val_fraction", "eval_batch_size", "seed"}


@dataclass
class TuneResult:
    folder: Path
    best_value: float
    best_params: dict
    best_run: Path
    best_config: Path        # best.yaml: `cnnkit train --config` takes it
    trials: list[dict] = field(default_factory=list)  # trials.csv's rows


def tune(trials: int = 20, *, out: str | Path = "tune", space: str | Path | dict | None = None,
         study: str = "cnnkit", storage: str | None = None, prune_after: int = 4,
         pruner: str = "median", log: Callable[[str], None] = print,
         progress: bool | None = None, **settings: Any) -> TuneResult:
    """Search settings for `cnnkit.train(**settings)` over `trials` trials (the study's
    total: a study that already has some, from an interrupted or a parallel tune, gets the
    rest). `space`: a YAML file or a dict of `name: {low, high[, log][, step]}` or
    `name: {choices: [...]}` (a list is choices); default: the space that fits the model
    family and recipe (`default_space`). `prune_after` trials run in full before the
    median pruner starts (`pruner="none"`: never)."""
    import optuna  # only here: `import cnnkit` stays light

    if trials < 1:
        raise SettingsError(f"--trials must be at least 1, got {trials}")
    if pruner not in ("median", "none"):
        raise SettingsError(f"--pruner takes median or none, got {pruner!r}")
    settings = {k: v for k, v in settings.items() if v is not None and k != "out"}
    base = make_config(**settings)
    preflight(base, check_out=False)
    given = read_space(space) if space is not None else None
    if given is not None:
        check_space(given, settings, space)
    folder = Path(out)
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    # a URL Optuna cannot open is told before any data loads
    store = _storage(optuna, url) if storage is not None else None
    runtime = select_runtime(base.device, amp=base.amp)
    # The run these settings would make, resolved on the data: its image size, probe or
    # schedule, lr and widths are what the default space is drawn around.
    resolved, ds = prepare(base, runtime)[:2]
    chosen = given or default_space(resolved, ds.image_size[0], _weights_size(base),
                                    base.time_budget is not None)
    if given is None:
        check_space(chosen, settings, None)
    key = "val_map" if ds.multi_label else "val_acc"
    data = {resolved.image_size: hold_out(ds, TUNE_FRACTION, base.seed)}

    def scored_on(size: int) -> Dataset:
        if size not in data:  # the image size is searched: the same photos at that size
            data[size] = hold_out(load_data(dataclasses.replace(resolved, image_size=size)),
                                  TUNE_FRACTION, base.seed)
        return data[size]

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnkitError(f"cannot create the tune folder {folder}: {e.strerror}") from None
    the_study = _open_study(optuna, study, store or _storage(optuna, url), url, storage is None,
                            base.seed, pruner, prune_after,
                            {"settings": settings, "space": chosen})
    if not the_study.get_trials(deepcopy=False):
        # The first trial is the run these settings make by default: the study's best is
        # then never worse than it on the held-out images.
        the_study.enqueue_trial(_defaults_in(chosen, resolved), user_attrs={"default": True})
    finished = _finished(the_study)
    summary = ", ".join(_describe(name, spec) for name, spec in chosen.items())
    log(f"tune: study {study!r} in {url}: {len(finished)} of {trials} trials done; "
        f"searching {summary}; each trial scored on {TUNE_FRACTION:.0%} of "
        f"{ds.name}'s training images ({len(data[resolved.image_size].val)}), held out")

    def objective(trial) -> float:
        params = suggest(trial, chosen)
        same = _same_settings(trial, params)
        if same is not None:  # (a choice space drawn again) its answer, not a second run
            trial.set_user_attr("repeat_of", same.number)
            return same.value
        run_dir = folder / "trials" / f"trial-{trial.number}"
        size = params.get("image_size", resolved.image_size)
        cfg = make_config(**{**settings, **params, "image_size": size, "out": str(run_dir),
                             "plots": False})
        start = time.perf_counter()
        marks: set[int] = set()

        def report(row: dict) -> None:
            # Trials are compared at the same share of their schedules, not the same epoch:
            # at a time budget a narrower net runs more epochs, and each schedule decays its
            # lr to its own end. Each 10% of the schedule passed gets the accuracy so far.
            if key not in row:  # an epoch without an evaluation (--eval-every)
                return
            done = 100 * (row["epoch"] + 1) // row["epochs"]
            for mark in range(10, done + 1, 10):
                if mark not in marks:
                    trial.report(row[key], mark)
                    marks.add(mark)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {row['epoch'] + 1} of "
                                         f"{row['epochs']}: {row[key]:.4f}")
        outcome = {"trial": trial.number, "study": study, "params": params}
        try:
            result = train(cfg, dataset=scored_on(size), log=_quiet, progress=False,
                           on_epoch=report)
        except optuna.TrialPruned as e:
            _note(run_dir, {**outcome, "state": "pruned", "why": str(e)})
            raise
        except (KeyboardInterrupt, Interrupted):  # (train turns Ctrl-C into Interrupted)
            _note(run_dir, {**outcome, "state": "interrupted"})
            raise KeyboardInterrupt from None  # the study stops, as Optuna stops on it
        except CnnkitError as e:
            if run_dir.is_dir():
                _note(run_dir, {**outcome, "state": "failed", "why": first_line(e)})
            trial.set_user_attr("error", first_line(e))
            raise
        value = result.metrics[-1][key]
        _note(run_dir, {**outcome, "state": "complete", key: value,
                        "seconds": time.perf_counter() - start})
        return value

    remaining = trials - len(finished)
    watching = interactive() if progress is None else progress
    with bar(total=trials, desc="trials", unit="trial", enabled=watching) as b:
        b.update(len(finished))

        def after(st, trial) -> None:
            b.update(1)
            log_line = _trial_line(trial, key)
            b.write(log_line) if watching else log(log_line)

        try:
            if remaining > 0:
                the_study.optimize(objective, n_trials=remaining, catch=(CnnkitError,),
                                   callbacks=[optuna.study.MaxTrialsCallback(
                                       trials, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)),
                                              after])
        except KeyboardInterrupt:
            raise Interrupted(f"tune interrupted; the finished trials are kept in {url}: "
                              "run the same command to go on") from None
    return _finish(the_study, folder, settings, chosen, key, resolved.image_size, log)


def default_space(cfg: Config, image_size: int, weights_size: int | None,
                  budget: bool) -> dict:
    """The search space around a resolved run `cfg` on images of `image_size` px, from
    weights trained at `weights_size` (None: not a model family's pretrained weights): for a
    linear probe, its image size; for fine-tuning, lr (÷5 to ×5), with pretrained weights
    also the backbone's lr multiplier, frozen epochs and image size; for the fast recipes,
    lr and Muon's other lr (÷2 to ×2), label smoothing, epochs (or, with a time budget, the
    widths), and the augmentation preset's strengths."""
    if cfg.linear_probe:
        return {"image_size": {"choices": sorted({probe_image_size(weights_size, scale)
                                                  for scale in (1.0, 1.3, 1.6, 2.0)})}}
    if cfg.recipe == "finetune":
        space = {"lr": _around(cfg.lr, 5), "label_smoothing": dict(low=0.0, high=0.3)}
        if weights_size:
            space.update(backbone_lr_mult=dict(low=0.01, high=1.0, log=True),
                         freeze_epochs=dict(low=0, high=2),
                         image_size={"choices": [weights_size,
                                                 probe_image_size(weights_size, 1.3)]})
        return space
    space = {"lr": _around(cfg.lr, 2)}
    if cfg.optimizer == "muon":
        space["sgd_lr"] = _around(cfg.sgd_lr, 2)
    space["label_smoothing"] = dict(low=0.0, high=0.4)
    if budget and cfg.width:  # the budget fixes the time: wider and fewer, or narrower and more
        space["width"] = {"choices": [",".join(str(max(8, 8 * round(int(w) * f / 8)))
                                               for w in cfg.width.split(","))
                                      for f in (0.75, 1.0, 1.25)]}
    elif not budget:
        space["epochs"] = dict(low=max(1, round(cfg.epochs / 2)),
                               high=max(2, round(cfg.epochs * 1.5)))
    if cfg.augment == "photo":
        space.update(crop_scale=dict(low=0.2, high=1.0), jitter=dict(low=0.0, high=0.4))
    elif cfg.augment == "cifar":
        space.update(translate=dict(low=0, high=max(1, image_size // 8)),
                     cutout=dict(low=0, high=max(1, image_size // 3)),
                     jitter=dict(low=0.0, high=0.4))
    return space


def read_space(space: str | Path | dict) -> dict:
    """A search space from a YAML file (or a dict already read): each setting's range."""
    where = "the search space"
    if not isinstance(space, dict):
        import yaml
        where = f"--space {space}"
        try:
            space = yaml.safe_load(Path(space).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"{where}: no such file") from None
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise SettingsError(f"{where}: not a readable YAML file ({first_line(e)})") from None
    if not isinstance(space, dict):
        raise SettingsError(f"{where}: expected a YAML mapping like 'lr: {{low: 0.1, high: "
                            "0.5, log: true}}'")
    out = {}
    for name, spec in space.items():
        if name not in field_names() or name in NOT_SEARCHED:
            searchable = sorted(set(field_names()) - NOT_SEARCHED)
            raise SettingsError(f"{where}: unknown parameter {name!r}; a space names "
                                f"settings of cnnkit train: {', '.join(searchable)}")
        if isinstance(spec, list):
            spec = {"choices": spec}
        if not isinstance(spec, dict) or not ({"choices"} <= spec.keys() or
                                              {"low", "high"} <= spec.keys()):
            raise SettingsError(f"{where}: {name} needs low and high (optionally log, step) "
                                f"or choices, got {spec!r}")
        unknown = set(spec) - {"choices", "low", "high", "log", "step"}
        if unknown:
            raise SettingsError(f"{where}: {name}: unknown key(s) {', '.join(sorted(unknown))}; "
                                "a range takes low, high, log, step; a list takes choices")
        out[name] = spec
    return out


def check_space(space: dict, settings: dict, source) -> None:
    """One line for a space with nothing to search, or with values cnnkit train refuses."""
    where = f"--space {source}" if isinstance(source, (str, Path)) else "the search space"
    live = {n: s for n, s in space.items() if len(s.get("choices", ())) > 1 or
            ("low" in s and s["low"] != s["high"])}
    if not live:
        raise SettingsError(f"{where} has nothing to search: give a setting a range "
                            "(low < high) or two or more choices")
    for name, spec in space.items():
        if "low" in spec:
            if not spec["low"] <= spec["high"]:
                raise SettingsError(f"{where}: {name}: low ({spec['low']}) is above high "
                                    f"({spec['high']})")
            if spec.get("log") and spec["low"] <= 0:
                raise SettingsError(f"{where}: {name}: a log range needs low > 0")
        for value in spec.get("choices") or (spec["low"], spec["high"]):
            try:
                make_config(**{**settings, name: value})
            except SettingsError as e:
                raise SettingsError(f"{where}: {name} = {value!r}: {e}") from None


def suggest(trial, space: dict) -> dict:
    """The trial's value of every setting in the space."""
    params = {}
    for name, spec in space.items():
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                 for k in ("low", "high")):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"],
                                             step=spec.get("step", 1),
                                             log=bool(spec.get("log")))
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               step=spec.get("step"),
                                               log=bool(spec.get("log")))
    return params


def _storage(optuna, url: str):
    """Optuna's database storage at `url`, with a heartbeat: a trial whose worker died
    (SIGKILL, a lost machine) is marked failed after 3 minutes instead of running forever."""
    from sqlalchemy.exc import IntegrityError, OperationalError  # (Optuna's own dependency)
    kw = {}
    if url.startswith("sqlite"):  # workers wait for each other's writes instead of failing
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat is experimental in Optuna's terms
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                                  **kw)
        except (IntegrityError, OperationalError) as e:
            # Workers started together on a new database race to create its tables: the
            # loser finds them made a moment later. (A server that stays away fails below.)
            if attempt == 5:
                error = e
            else:
                time.sleep(0.5 * (attempt + 1))
        except Exception as e:  # noqa: BLE001 (SQLAlchemy's and Optuna's errors, many kinds)
            error = e
            break
    raise SettingsError(f"--storage {url}: Optuna cannot open it ({first_line(error)}); "
                        "give a database URL such as sqlite:///tune.db")


def _open_study(optuna, name: str, storage, url: str, local: bool, seed: int, pruner: str,
                prune_after: int, started_with: dict):
    """The study, created or reopened. A study reopened with other settings or another
    space is refused: its trials would answer another question."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # cnnkit prints a line per trial
    # (a trial reports at each 10% of its schedule, and none is stopped before 30%: early
    # accuracy at a high lr says little)
    prune = optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=25) \
        if pruner == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=name, storage=storage, pruner=prune,
                                direction="maximize", load_if_exists=True)
    # One worker per folder (the default storage) samples reproducibly, a resumed study
    # going on from where it stood, not again from its first draws; workers sharing a
    # --storage draw apart, or the same seed would make them try the same settings.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.get_trials(deepcopy=False)) if local else None)
    saved = study.user_attrs.get("started_with")
    wanted = json.loads(json.dumps(started_with))
    if saved is None:
        study.set_user_attr("started_with", wanted)
    elif saved != wanted:
        raise SettingsError(f"study {name!r} in {url} was started with other settings or "
                            "another space; use another --out or --study (or the same "
                            "settings to go on with it)")
    return study


def _same_settings(trial, params: dict):
    """A complete trial of the study with these very settings, if any: the sampler may draw
    a point again (it will, from a space of a few choices), and a second run of it would
    spend its seconds to tell little or, for a deterministic one like a probe, nothing."""
    import optuna
    for earlier in trial.study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.COMPLETE,)):
        if earlier.params == params and "repeat_of" not in earlier.user_attrs:
            return earlier
    return None


def _defaults_in(space: dict, cfg: Config) -> dict:
    """The resolved run's own values of the space's settings, where the space holds them."""
    values = {}
    for name, spec in space.items():
        value = getattr(cfg, name)
        inside = value in spec["choices"] if "choices" in spec else \
            value is not None and spec["low"] <= value <= spec["high"]
        if inside:
            values[name] = value
    return values


def _finished(study) -> list:
    import optuna
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done]


def _finish(study, folder: Path, settings: dict, space: dict, key: str, size: int,
            log) -> TuneResult:
    """trials.csv, best.yaml and the pictures, from the study as it stands (every worker's
    trials), and the lines that say what was found."""
    import optuna
    import yaml
    rows = [_row(t, key, folder) for t in study.get_trials(deepcopy=False)]
    names = list(space)
    columns = ["trial", "state", key, "seconds", *names, "run"]

    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(folder / "trials.csv", lambda f: f.write(table.getvalue().encode()))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise CnnkitError(f"no trial completed (see {folder / 'trials.csv'}); nothing to "
                          "choose from")
    best = study.best_trial
    chosen = {**settings, **best.params}
    if size is not None:
        chosen.setdefault("image_size", size)
    atomic_write(folder / "best.yaml", lambda f: f.write(
        (f"# cnnkit tune: trial {best.number} of study {study.study_name!r}, {key} "
         f"{best.value:.4f} on {TUNE_FRACTION:.0%} of the training images held out\n"
         f"# train on all of them: cnnkit train --config {folder / 'best.yaml'}\n" +
         yaml.safe_dump(chosen, sort_keys=False)).encode()))
    pictures = _draw(study, folder)
    log(f"{'trial':>6} {'state':>9} {key:>8} {'seconds':>8}  settings")
    for r in rows:
        value = f"{r[key]:.4f}" if isinstance(r.get(key), float) else "-"
        seconds = f"{r['seconds']:.1f}" if isinstance(r.get("seconds"), float) else "-"
        log(f"{r['trial']:>6} {r['state']:>9} {value:>8} {seconds:>8}  " +
            ", ".join(f"{n}={_short(r[n])}" for n in names if n in r))
    best_run = folder / "trials" / f"trial-{best.user_attrs.get('repeat_of', best.number)}"
    log(f"best: trial {best.number}, {key} {best.value:.4f}, run {best_run}; settings in "
        f"{folder / 'best.yaml'} (cnnkit train --config {folder / 'best.yaml'}); "
        f"{len(rows)} trials in {folder / 'trials.csv'}" +
        (f"; pictures {', '.join(str(p) for p in pictures)}" if pictures else ""))
    return TuneResult(folder, best.value, dict(best.params), best_run, folder / "best.yaml",
                      rows)


def _draw(study, folder: Path) -> list[Path]:
    """Optuna's own pictures of the study: the optimization history and, from two complete
    trials on, the settings' importances (fANOVA)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis
    drawn = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in (("history", vis.plot_optimization_history),
                           ("importances", vis.plot_param_importances)):
            try:
                ax = draw(study)
            except (ValueError, RuntimeError):  # too few complete trials to say
                continue
            figure = ax.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=100)
            plt.close(figure)
            drawn.append(folder / f"{name}.png")
    return drawn


def _row(trial, key: str, folder: Path) -> dict:
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    value = trial.value if trial.value is not None else (
        max(trial.intermediate_values.values()) if trial.intermediate_values else None)
    run = trial.user_attrs.get("repeat_of", trial.number)
    return {"trial": trial.number, "state": trial.state.name.lower(), key: value,
            "seconds": seconds, **trial.params,
            "run": str(folder / "trials" / f"trial-{run}")}


def _trial_line(trial, key: str) -> str:
    settings = ", ".join(f"{n}={_short(v)}" for n, v in trial.params.items())
    state = trial.state.name.lower()
    if state == "pruned":  # (Optuna gives a pruned trial its last reported value)
        what = f"pruned at {max(trial.intermediate_values, default=0)}% of its schedule" + \
            (f": {key} {trial.value:.4f}" if trial.value is not None else "")
    elif "repeat_of" in trial.user_attrs:
        what = f"the settings of trial {trial.user_attrs['repeat_of']}: {key} {trial.value:.4f}"
    elif trial.value is not None:
        what = f"{key} {trial.value:.4f}"
    else:
        what = f"{state}: {trial.user_attrs.get('error', 'see its run folder')}"
    default = " (the defaults)" if trial.user_attrs.get("default") else ""
    return f"trial {trial.number}{default}: {what} ({settings})"


def _note(run_dir: Path, record: dict) -> None:
    """tune.json in the trial's run folder: what the trial was and how it ended."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "tune.json", lambda f: f.write(json.dumps(record, indent=2).encode()))


def _describe(name: str, spec: dict) -> str:
    if "choices" in spec:
        return f"{name} in {{{', '.join(map(_short, spec['choices']))}}}"
    return f"{name} {_short(spec['low'])}..{_short(spec['high'])}" + \
        (" (log)" if spec.get("log") else "")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _around(value: float, factor: float) -> dict:
    return dict(low=value / factor, high=value * factor, log=True)


def _weights_size(cfg: Config) -> int | None:
    """The image size the starting weights were trained at, for a model family's
    pretrained weights; None otherwise."""
    return model_entry(cfg.model).pretrained_info()["image_size"] if pretrained_form(cfg) \
        else None


def _quiet(message: str) -> None:
    pass

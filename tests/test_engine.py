import platform
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.recipes import make_config
from cnnkit.engine import tta_logits
from cnnkit.optim import Muon, build_optimizer, lr_factor, newton_schulz


class Probe(nn.Module):
    """A model that is not flip-invariant, so TTA has something to average."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_tta_flip_average_is_mirror_invariant():
    torch.manual_seed(0)
    model, x = Probe(), torch.randn(3, 3, 6, 6)
    assert not torch.allclose(model(x), model(x.flip(3)))
    assert torch.allclose(tta_logits(model, x, 1), tta_logits(model, x.flip(3), 1), atol=1e-6)
    assert torch.equal(tta_logits(model, x, 0), model(x))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[:, :, :6, :6], padded[:, :, 2:, 2:]]
    expected = 0.5 * tta_logits(model, x, 1) + 0.25 * sum(tta_logits(model, v, 1) for v in views)
    assert torch.allclose(tta_logits(model, x, 2), expected, atol=1e-6)
    # a model trained without flips is never shown a mirror image
    assert torch.equal(tta_logits(model, x, 1, mirror=False), model(x))
    plain = 0.5 * model(x) + 0.25 * sum(model(v) for v in views)
    assert torch.allclose(tta_logits(model, x, 2, mirror=False), plain, atol=1e-6)


def test_linear_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 100, "linear", 0.2, 0.1) for s in range(101)]
    assert f[0] == 0 and f[20] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert f[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[20:], f[21:]))
    g = [lr_factor(s, 100, "onecycle", 0.25) for s in range(101)]
    assert g[25] == pytest.approx(1.0) and g[100] == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(50, 100, "constant", 0.3) == 1.0


def test_norm_biases_get_the_higher_lr_and_no_decay():
    model = cnnkit.create_model("fastnet", widths=(8, 8, 8))
    cfg = make_config(optimizer="sgd", lr=0.1, norm_bias_lr_mult=64, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    norm_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & norm_ids:
            assert ids <= norm_ids and group["lr"] == pytest.approx(6.4)
            assert group["weight_decay"] == 0
        elif any(p.ndim > 1 for p in group["params"]):
            assert group["weight_decay"] == 1e-3 and group["lr"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= {id(p) for g in opt.param_groups for p in g["params"]}


def test_fast_recipe_is_the_default():
    cfg = make_config()
    assert cfg.recipe == "fast" and cfg.model == "fastnet"
    assert cfg.flip == "alternate" and cfg.tta == 2 and cfg.normalize
    assert cfg.optimizer == "muon" and cfg.schedule == "linear" and cfg.lr_floor == 0


@pytest.mark.parametrize("recipe,device,n,expect", [
    ("fast", "cpu", 4000, dict(epochs=16, batch_size=256, width="32,128,128", lr=0.24,
                              sgd_lr=0.053 * 256, eval_every=4)),
    ("fast", "cuda", 50_000, dict(epochs=8, batch_size=1024, width="64,256,256")),
    # a mid-sized data set keeps about 16 steps an epoch on a GPU too
    ("fast", "cuda", 4068, dict(batch_size=256, sgd_lr=0.053 * 256)),
    ("fast", "cuda", 10_000, dict(batch_size=512)),
    ("fast", "cpu", 500, dict(epochs=32)),  # little data: more epochs, at most twice
    ("fast-sgd", "cpu", 4000, dict(epochs=20, batch_size=128, lr=0.2, optimizer="sgd",
                                  sgd_lr=None, warmup=0.23)),
    ("tutorial", "cpu", 4000, dict(epochs=10, batch_size=32, lr=0.001, eval_every=1)),
])
def test_recipe_settings_fitted_to_data_and_device(recipe, device, n, expect):
    from cnnkit.recipes import fill_recipe_defaults
    cfg = fill_recipe_defaults(make_config(recipe=recipe), n, device)
    for key, value in expect.items():
        assert getattr(cfg, key) == (pytest.approx(value) if isinstance(value, float)
                                     else value), key


def test_time_budget_plans_a_whole_schedule(tmp_path):
    result = cnnkit.train(plots=False,
                          data="digits", time_budget=1.0, width="8,16,16", out=str(tmp_path / "r"),
                          log=lambda s: None)
    assert result.config.epochs >= 1 and len(result.metrics) == result.config.epochs
    import json
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["epochs"] == result.config.epochs and saved["time_budget"] == 1.0


def test_ema_run_saves_the_averaged_weights(tmp_path):
    result = cnnkit.train(plots=False, data="digits", epochs=2, ema=0.9, width="8,16,16",
                          out=str(tmp_path / "r"), log=lambda s: None)
    lm = cnnkit.load(result.run_dir / "last.pt")
    ev = cnnkit.evaluate(lm, device="cpu")
    assert ev["accuracy"] == pytest.approx(result.metrics[-1]["val_acc"])


def test_newton_schulz_keeps_the_singular_vectors_and_evens_the_values():
    g = torch.randn(48, 27, generator=torch.Generator().manual_seed(0)).double()
    u, sv, vt = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g, steps=5)
    values = torch.linalg.svdvals(x)
    assert values.min() > 0.6 and values.max() < 1.25 and sv.max() / sv.min() > 3
    # the same singular vectors: x is close to u f(s) vᵀ with every f(s) > 0
    assert torch.allclose(u.T @ x @ vt.T, torch.diag(torch.diagonal(u.T @ x @ vt.T)),
                          atol=1e-6)


def test_muon_trains_hidden_weights_and_leaves_the_rest_to_sgd():
    model = cnnkit.create_model("fastnet", widths=(8, 16, 16))
    cfg = make_config(optimizer="muon", lr=0.24, sgd_lr=10.0, head_lr_mult=0.5,
                      weight_decay=1e-3, batch_size=256)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and all(p.ndim == 4 for p in muon[0]["params"])
    head = [g for g in opt.param_groups if any(p is model.get_classifier().weight
                                               for p in g["params"])][0]
    assert head["lr"] == 5.0 and head["weight_decay"] == 1e-3 and not head["muon"]
    conv = model.blocks[0].conv1.weight
    before = conv.detach().clone()
    loss = model(torch.randn(4, 3, 32, 32)).square().sum()
    loss.backward()
    opt.step()
    # renormalized to norm sqrt(out channels), then moved by lr × an orthogonal update
    step = conv.detach() - before * (len(before) ** 0.5 / before.norm())
    assert torch.linalg.svdvals(step.reshape(len(step), -1) / 0.24).max() < 1.25
    assert step.norm() > 0.1


@pytest.mark.parametrize("name", cnnkit.list_models())
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "muon"])
def test_every_model_trains_with_every_optimizer(name, optimizer):
    from cnnkit.recipes import fill_recipe_defaults
    torch.manual_seed(0)
    model = cnnkit.create_model(name, num_classes=3, in_channels=3, image_size=16)
    model.init_from_data(torch.randn(8, 3, 16, 16))
    cfg = fill_recipe_defaults(make_config(model=name, optimizer=optimizer), 100, "cpu")
    opt = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())
               if p.requires_grad]
    assert all(changed) and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_time_budget_is_replanned_for_the_whole_command():
    import time
    from types import SimpleNamespace
    from cnnkit import distributed
    from cnnkit.optim import build_scheduler
    from cnnkit.setup import Budget, replan
    model = cnnkit.create_model("seed-simple")
    cfg = make_config(optimizer="sgd", lr=0.1, time_budget=10.0, epochs=5)
    opt = build_optimizer(model, cfg)
    scheduler = build_scheduler(opt, cfg, 50)
    info = SimpleNamespace(config=cfg)
    run = SimpleNamespace(cfg=cfg, info=info, dist=distributed.SINGLE, total_steps=50,
                          steps_per_epoch=10, step=SimpleNamespace(scheduler=scheduler),
                          budget=None)
    # the command started 3.05 s ago; 10 s at 0.1 s a step, nothing else to pay for:
    # (9.9 - 3.05) / 0.1 = 68.5 more steps (a little less, as the clock runs on)
    run.budget = Budget(10.0, time.perf_counter() - 3.05, eval_passes=1, after=0.0)
    assert replan(run, pace=0.1, eval_seconds=0.0, steps_done=20, epochs_done=2) == 88
    assert run.total_steps == 88 and run.cfg.epochs == 9 and run.info.config.epochs == 9
    assert all(s.total == 88 for s in scheduler.lr_lambdas)
    # the schedule now ends at step 88; its state is saved with the checkpoint
    assert scheduler.state_dict()["lr_lambdas"][0]["total"] == 88
    # 0.2 s an evaluation, the final one 6 passes (TTA), 1 s of report and exit: 9.9 - 3.05
    # - 0.2 (this epoch's) - 5 * 0.2 - 1 = 4.65 s, at 0.1 + 0.2 / 10 s a step: 38.75 steps
    run.budget = Budget(10.0, time.perf_counter() - 3.05, eval_passes=6, after=1.0)
    assert replan(run, pace=0.1, eval_seconds=0.2, steps_done=20, epochs_done=2) == 58
    assert run.cfg.epochs == 6
    # the same, evaluating every 4th epoch: none is due after epoch 2, and the 4.85 s left
    # pay the final one (0.2 s) and a quarter of one per epoch, less the quarter the final
    # one replaces: (4.85 - 0.2 + 0.05) / (0.1 + 0.2 / 40) = 44.8 steps
    run.budget = Budget(10.0, time.perf_counter() - 3.05, eval_passes=6, after=1.0,
                        eval_every=4)
    assert replan(run, pace=0.1, eval_seconds=0.2, steps_done=20, epochs_done=2) == 64
    assert run.cfg.epochs == 7
    # over budget already: no step more
    run.budget = Budget(10.0, time.perf_counter() - 12.0, eval_passes=1, after=0.0)
    assert replan(run, pace=0.1, eval_seconds=0.0, steps_done=30, epochs_done=3) == 30
    assert run.cfg.epochs == 3
    # 0.55 s left after this epoch's evaluation: not an epoch's 10 steps at 0.1 s and 0.2 s
    # of evaluation, but 3 steps (0.35 s), and an evaluation after them: a short 4th epoch
    run.budget = Budget(10.0, time.perf_counter() - 9.15, eval_passes=1, after=0.0)
    assert replan(run, pace=0.1, eval_seconds=0.2, steps_done=28, epochs_done=3) == 31
    assert run.cfg.epochs == 4


def test_patience_or_another_recipe_evaluates_every_epoch():
    from cnnkit.recipes import fill_recipe_defaults
    assert fill_recipe_defaults(make_config(epochs=10), 4000, "cpu").eval_every == 2
    assert fill_recipe_defaults(make_config(epochs=3), 4000, "cpu").eval_every == 1
    assert fill_recipe_defaults(make_config(patience=3), 4000, "cpu").eval_every == 1
    assert fill_recipe_defaults(make_config(eval_every=5), 4000, "cpu").eval_every == 5
    assert fill_recipe_defaults(make_config(model="tv:resnet18"), 4000, "cpu").eval_every == 1
    with pytest.raises(cnnkit.CnnkitError, match="--eval-every must be at least 1"):
        make_config(eval_every=0)


def test_a_run_evaluates_every_few_epochs_and_after_the_last(tmp_path):
    from cnnkit.runs import list_runs, read_metrics
    lines = []
    result = cnnkit.train(plots=True, data="digits", epochs=5, eval_every=2, width="8,16,16",
                          out=str(tmp_path / "r"), log=lines.append)
    evaluated = [m["epoch"] for m in result.metrics if "val_acc" in m]
    assert evaluated == [1, 3, 4] and len(result.metrics) == 5
    assert all(m["val_seconds"] == 0 for m in result.metrics if "val_acc" not in m)
    # the table shows "-" for an epoch without an evaluation; metrics.csv an empty cell
    rows = [line.split() for line in lines if line.split()[0][:2] in ("1/", "2/", "3/")]
    assert rows[0][3:5] == ["-", "-"] and rows[1][3] != "-" and rows[2][3:5] == ["-", "-"]
    saved = read_metrics(tmp_path / "r")
    assert [("val_acc" in m) for m in saved] == [False, True, False, True, True]
    # best.pt is the best of the evaluated epochs
    best = max((result.metrics[i] for i in evaluated), key=lambda m: m["val_acc"])
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=True)["epoch"] == best["epoch"]
    assert result.best_val_acc == best["val_acc"]
    assert list_runs(tmp_path)[0]["best_val_acc"] == pytest.approx(best["val_acc"])
    assert (tmp_path / "r" / "curves.png").exists()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_training_process_keeps_the_memory_it_frees():
    """After keep_freed_memory(), 64 MB freed stays in the process (the next step reuses
    it, no page faults); without it, or when the environment tunes malloc itself, glibc
    hands it back to the kernel."""
    import os
    import subprocess
    import sys
    code = ("import os, torch; from cnnkit.device import keep_freed_memory\n"
            "kept = keep_freed_memory()\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * "
            "os.sysconf('SC_PAGE_SIZE')\n"
            "x = torch.ones(2**24); before = rss(); del x\n"
            "print(kept, (before - rss()) / 2**20)")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}

    def freed(**env) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], float(out[1])
    kept, mb = freed()
    assert kept == "True" and mb < 8, mb
    kept, mb = freed(MALLOC_ARENA_MAX="4")  # the user's own malloc settings win
    assert kept == "False" and mb > 56, mb


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux' /proc")
def test_the_cli_counts_a_time_budget_from_its_process_start():
    """process_age() is the seconds since the process started: at least the half second
    this child slept, and no more than the parent saw it live."""
    import subprocess
    import sys
    import time
    code = ("import time; time.sleep(0.5); from cnnkit.cli import process_age; "
            "print(process_age())")
    start = time.perf_counter()
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    lived = time.perf_counter() - start
    assert 0.5 <= age <= lived + 0.02  # + a clock tick: /proc counts in hundredths


def test_batch_order_drops_the_smaller_last_batch_when_asked():
    from cnnkit.engine import batch_order
    sizes = lambda **kw: [len(b) for b in batch_order(10, 4, torch.Generator(), **kw)]  # noqa: E731
    assert sizes() == [4, 4, 2] and sizes(drop_last=True) == [4, 4]
    assert sizes(world=2) == [4, 4]  # 2 images cannot give 2 processes 2 each
    assert sorted(torch.cat(batch_order(10, 5, torch.Generator(), drop_last=True)).tolist()) \
        == list(range(10))  # nothing dropped when the batches divide the data
    assert make_config().drop_last and not make_config(recipe="fast-sgd").drop_last

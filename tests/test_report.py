"""Pictures, report.html, lr-find, runs/compare, TensorBoard logs."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cnnkit
from cnnkit.data import load_dataset
from cnnkit.device import select_runtime
from cnnkit.engine import TrainStep, batch_order
from cnnkit.lrfind import lr_range_test
from cnnkit.optim import build_optimizer
from cnnkit.recipes import make_config
from cnnkit.transforms import Augment, to_input

PICTURES = ("curves.png", "confusion.png", "top-losses.png", "per-class.png")


def _readable_png(path, min_side=200):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    assert arr.std() > 5, f"{path} looks blank"
    return arr


def test_every_run_draws_its_pictures(png_run):
    for name in PICTURES + ("report.html", "evaluation.json"):
        assert (png_run.run_dir / name).is_file(), name
    for name in PICTURES:
        _readable_png(png_run.run_dir / name)


def test_pictures_are_drawn_from_the_right_numbers(png_run, png_sample):
    record = json.loads((png_run.run_dir / "evaluation.json").read_text())
    ds = load_dataset(str(png_sample), val_fraction=0.2, seed=0)
    cm = torch.tensor(record["confusion_matrix"])
    assert int(cm.sum()) == len(ds.val) == record["num_images"]
    assert record["accuracy"] == pytest.approx(png_run.metrics[-1]["val_acc"])
    # top losses: exactly the highest-loss validation items of the final model
    lm = cnnkit.load(png_run.run_dir / "last.pt")
    with torch.no_grad():
        logits = lm.model(to_input(ds.val.images, lm.mean, lm.std))
    losses = F.cross_entropy(logits, ds.val.labels, reduction="none")
    expected = losses.argsort(descending=True)[:len(record["top_losses"])].tolist()
    assert [t["index"] for t in record["top_losses"]] == expected
    assert record["top_losses"][0]["loss"] == pytest.approx(float(losses.max()), rel=1e-4)


def test_report_is_self_contained(png_run):
    page = (png_run.run_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "Most confused classes" in page


def test_report_renders_in_headless_chromium(png_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    shot = tmp_path / "shot.png"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                        f"--screenshot={shot}", (png_run.run_dir / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=600)
    assert shot.is_file(), p.stderr[-2000:]
    arr = _readable_png(shot)
    assert (arr < 128).mean() > 0.01  # text and pictures, not an empty white page


def test_lr_range_test_leaves_model_and_optimizer_bitwise_unchanged():
    torch.manual_seed(0)
    ds = load_dataset("digits", val_fraction=0.2)
    cfg = make_config(optimizer="sgd", lr=0.1)
    model = cnnkit.create_model("fastnet", in_channels=1, image_size=8, widths=(8, 16, 16))
    opt = build_optimizer(model, cfg)
    x = to_input(ds.train.images[:64], [0.5], [0.3])
    F.cross_entropy(model(x), ds.train.labels[:64]).backward()
    opt.step()  # momentum buffers exist now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    step = TrainStep(opt, None, Augment("random", 1, 0), [0.5], [0.3], select_runtime("cpu"))
    result = lr_range_test(model, ds.train, step, batch_size=64, base_lr=0.1, steps=60)
    assert len(result["lrs"]) > 20 and result["lrs"] == sorted(result["lrs"])
    assert result["lrs"][0] <= result["suggested_lr"] <= result["lrs"][-1]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(opt_before[k], v) for k, v in opt.state_dict()["state"][0].items())
    assert all(g["lr"] in (0.1, 0.1 * cfg.norm_bias_lr_mult) for g in opt.param_groups)


def test_lr_range_test_steps_like_training():
    """The range test is the training step: label smoothing in the loss, and every parameter
    group's lr (BatchNorm biases at 64×) moved in proportion, not set to one value."""
    torch.manual_seed(0)
    ds = load_dataset("digits", val_fraction=0.2)
    cfg = make_config(optimizer="sgd", lr=0.1, label_smoothing=0.2)
    model = cnnkit.create_model("fastnet", in_channels=1, image_size=8, widths=(8, 16, 16))
    opt = build_optimizer(model, cfg)
    ratios = []

    def record(optimizer, args, kwargs):
        lrs = [g["lr"] for g in optimizer.param_groups]
        ratios.append(max(lrs) / min(lrs))
    opt.register_step_pre_hook(record)
    # The loss of the first step, computed here independently: the first batch's indices
    # come from the same seeded order; no augmentation, so the inputs are the images.
    first = batch_order(len(ds.train), 64, torch.Generator().manual_seed(5))[0]
    with torch.no_grad():
        model.train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = F.cross_entropy(model(to_input(ds.train.images[first], [0.5], [0.3])),
                                   ds.train.labels[first], label_smoothing=0.2).item()
        model.load_state_dict(state)  # undo the BatchNorm statistics update
    step = TrainStep(opt, None, Augment(), [0.5], [0.3], select_runtime("cpu"),
                     label_smoothing=0.2)
    result = lr_range_test(model, ds.train, step, batch_size=64, base_lr=cfg.lr, steps=30,
                           seed=5)
    assert result["losses"][0] == pytest.approx(expected, rel=1e-4)
    assert len(ratios) >= 20 and all(r == pytest.approx(cfg.norm_bias_lr_mult) for r in ratios)


def test_lr_find_cli_plots_and_suggests(tmp_path, capsys):
    from cnnkit.cli import main
    assert main(["lr-find", "--data", "digits", "--width", "8,16,16", "--steps", "40",
                 "--out", str(tmp_path / "lr.png")]) == 0
    assert "suggested lr" in capsys.readouterr().out
    _readable_png(tmp_path / "lr.png")


def test_runs_table_compare_and_eval_out(png_run, tmp_path, png_sample, capsys):
    from cnnkit.cli import main
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copytree(png_run.run_dir, folder / "a")
    cnnkit.train(plots=False, data="digits", epochs=2, width="8,16,16", out=str(folder / "b"),
                 log=lambda s: None)
    assert main(["runs", str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["run"].split("/")[-1] for r in rows) == ["a", "b"]
    b = next(r for r in rows if r["run"].endswith("b"))
    assert b["model"] == "fastnet" and b["epochs"] == "2/2" and 0 <= b["best_val_acc"] <= 1
    assert main(["compare", str(folder / "a"), str(folder / "b"), "--out",
                 str(tmp_path / "cmp.png")]) == 0
    _readable_png(tmp_path / "cmp.png")
    assert main(["eval", str(png_run.run_dir), "--data", str(png_sample), "--split", "all",
                 "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert record["num_images"] == 200 and record["split"] == "all"
    for name in ("confusion.png", "top-losses.png", "per-class.png", "report.html"):
        assert (tmp_path / "ev" / name).is_file()


def test_show_batch_augmented_differs_from_plain(tmp_path, png_sample):
    from cnnkit.cli import main
    assert main(["show-batch", "--data", str(png_sample), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["show-batch", "--data", str(png_sample), "--augmented", "--translate", "4",
                 "--out", str(tmp_path / "b.png")]) == 0
    a, b = _readable_png(tmp_path / "a.png"), _readable_png(tmp_path / "b.png")
    assert a.shape == b.shape and np.abs(a - b).mean() > 1


def test_tensorboard_logs_scalars_per_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = cnnkit.train(plots=False, data="digits", epochs=3, width="8,16,16", tensorboard=True,
                          out=str(tmp_path / "r"), log=lambda s: None)
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("val/acc")]
    assert values == pytest.approx([m["val_acc"] for m in result.metrics])
    assert "train/batch" in acc.Tags()["images"]


def test_eval_reports_top5_precision_recall_f1_as_scikit_learn_computes_them(png_run):
    from sklearn.metrics import f1_score, precision_score, recall_score

    from cnnkit.evaluate import format_report
    record = cnnkit.evaluate(png_run.run_dir, device="cpu")
    # The same predictions, computed here as eval computes them (one batch, channels_last,
    # no test-time augmentation for this run): the run's val split through its model.
    lm = cnnkit.load(png_run.run_dir)
    ds = lm.info.load_data()
    model = lm.model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        probs = model(to_input(ds.val.images, lm.mean, lm.std,
                               memory_format=torch.channels_last)).softmax(1)
    y, pred = ds.val.labels.numpy(), probs.argmax(1).numpy()
    top5 = (probs.topk(5, dim=1).indices == ds.val.labels[:, None]).any(1).float().mean()
    assert record["num_images"] == len(y) == 40
    assert record["top5_accuracy"] == pytest.approx(float(top5))
    labels = list(range(10))
    scores = {"precision": precision_score, "recall": recall_score, "f1": f1_score}
    for name, fn in scores.items():
        for average in ("macro", "weighted"):
            want = fn(y, pred, labels=labels, average=average, zero_division=0)
            assert record[f"{average}_avg"][name] == pytest.approx(want), (average, name)
        per_class = fn(y, pred, labels=labels, average=None, zero_division=0)
        assert [record["per_class"][c][name] for c in lm.classes] == pytest.approx(per_class)
    assert [record["per_class"][c]["support"] for c in lm.classes] == \
        [int((y == i).sum()) for i in labels]
    text = format_report(record)
    assert text.splitlines()[1].startswith("top-5 accuracy") and "macro average" in text

import csv
import json

import pytest
import torch

import cnnkit
from cnnkit.recipes import RECIPES, make_config
from cnnkit.errors import CnnkitError


def test_tutorial_recipe_is_the_tutorial_run():
    cfg = make_config(recipe="tutorial")
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum) == \
        ("seed-cnn", 10, 32, "sgd", 0.001, 0.9)
    assert not cfg.normalize and cfg.flip == "none" and cfg.translate == 0 and cfg.cutout == 0
    assert cfg.schedule == "constant" and cfg.weight_decay == 0 and cfg.label_smoothing == 0
    # explicit settings win over the recipe
    assert make_config(recipe="tutorial", epochs=3, lr=0.1).epochs == 3
    with pytest.raises(CnnkitError, match="tutorial"):
        make_config(recipe="nope")
    with pytest.raises(CnnkitError, match="valid settings"):
        make_config(epochz=3)
    assert set(RECIPES["tutorial"]) <= set(cfg.to_dict())


def test_short_run_on_real_subset_learns(cifar_subset, tmp_path):
    result = cnnkit.train(plots=False,
                          data=str(cifar_subset), model="seed-simple", epochs=3, batch_size=64,
                          optimizer="adamw", lr=2e-3, normalize=True, flip="random",
                          val_fraction=0.2, seed=0, out=str(tmp_path / "run"),
                          log=lambda s: None)
    accs = [m["val_acc"] for m in result.metrics]
    assert accs[-1] > 0.30, accs  # chance is 0.10
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


def test_run_folder_contents(png_run):
    run = png_run.run_dir
    meta = json.loads((run / "config.json").read_text())
    assert meta["model"] == "seed-simple" and meta["epochs"] == 2
    assert meta["classes"][:2] == ["airplane", "automobile"] and meta["input_size"] == [32, 32]
    assert meta["mean"] == [0.0, 0.0, 0.0] and meta["std"] == [1.0, 1.0, 1.0]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert list(rows[0])[:6] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                 "seconds"]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["run"] == meta  # one saved-run format: config.json is the checkpoint's
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["metrics"]["val_acc"] == max(float(r["val_acc"]) for r in rows)


def test_checkpoint_reloads_to_identical_logits(png_run, png_sample):
    run = png_run.run_dir
    ckpt = torch.load(run / "last.pt", weights_only=True)
    model = cnnkit.create_model("seed-simple").eval()
    model.load_state_dict(ckpt["state_dict"])
    lm = cnnkit.load(run / "last.pt")
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(lm.model(x), model(x))
    assert lm.classes == ckpt["run"]["classes"] and lm.image_size == (32, 32)


def test_a_checkpoint_of_cnnkit_0_1_still_loads_and_evaluates(png_run, tmp_path):
    """cnnkit 0.1 kept the run's facts at the checkpoint's top level, the config nested."""
    new = torch.load(png_run.run_dir / "best.pt", weights_only=True)
    run = new["run"]
    config = {k: run[k] for k in cnnkit.Config().to_dict()}
    old = {"model": run["model"], "model_args": run["model_args"], "classes": run["classes"],
           "in_channels": run["in_channels"], "image_size": run["input_size"],
           "mean": run["mean"], "std": run["std"], "epoch": new["epoch"],
           "metrics": new["metrics"], "config": config, "data_source": run["data_source"],
           "state_dict": new["state_dict"]}
    torch.save(old, tmp_path / "old.pt")
    lm = cnnkit.load(tmp_path / "old.pt")
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(lm.model(x), cnnkit.load(png_run.run_dir / "best.pt").model(x))
    assert lm.classes == run["classes"] and lm.config.seed == run["seed"]
    record = cnnkit.evaluate(tmp_path / "old.pt", device="cpu")
    assert record["num_images"] == 40 and record["split"] == "val"
    assert record["accuracy"] == cnnkit.evaluate(png_run.run_dir, device="cpu")["accuracy"]


def test_same_seed_same_run(tmp_path):
    def run(out):
        return cnnkit.train(plots=False, data="digits", epochs=2, batch_size=64, lr=0.05, seed=3,
                            flip="random", translate=1, out=str(tmp_path / out),
                            log=lambda s: None)
    a, b = run("a"), run("b")
    drop = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k} for m in ms]  # noqa
    assert drop(a.metrics) == drop(b.metrics)
    sa = torch.load(a.run_dir / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(b.run_dir / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"precious")
    with pytest.raises(CnnkitError, match="never overwrites"):
        cnnkit.train(plots=False, data="digits", epochs=1, out=str(out), log=lambda s: None)
    assert (out / "last.pt").read_bytes() == b"precious"


def test_default_run_folders_are_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = cnnkit.train(plots=False, data="digits", epochs=1, log=lambda s: None)
    b = cnnkit.train(plots=False, data="digits", epochs=1, log=lambda s: None)
    assert a.run_dir.name == "digits-fastnet" and b.run_dir.name == "digits-fastnet-2"


def test_evaluate_matches_training_and_counts(png_run):
    result = cnnkit.evaluate(png_run.run_dir, device="cpu")
    best = max(m["val_acc"] for m in png_run.metrics)
    assert result["accuracy"] == pytest.approx(best)
    cm = torch.tensor(result["confusion_matrix"])
    assert int(cm.sum()) == result["num_images"] == 40
    assert float(cm.trace()) / 40 == pytest.approx(result["accuracy"])
    assert set(result["per_class_accuracy"]) == set(result["classes"])


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    import os
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": "seed-cnn", "state_dict": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CnnkitError, match="could run code"):
        cnnkit.load(tmp_path / "evil.pt")
    assert not marker.exists()

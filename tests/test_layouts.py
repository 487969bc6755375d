"""Folder layouts users bring, and runs that remember where their data is."""
import json
import shutil

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.cli import main
from cnnkit.data import load_dataset, read_image
from cnnkit.errors import CnnkitError


def _three_split(root, png_sample):
    """Ultralytics' classify layout: train/ val/ test/, each with cat/ and dog/; the files
    of each class dealt out 10 / 5 / the rest."""
    counts = {}
    for c in ("cat", "dog"):
        files = sorted((png_sample / c).glob("*.png"))
        for split, part in (("train", files[:10]), ("val", files[10:15]), ("test", files[15:])):
            (root / split / c).mkdir(parents=True)
            for f in part:
                shutil.copy(f, root / split / c / f.name)
            counts[split] = counts.get(split, 0) + len(part)
    return counts


def test_three_split_folder_keeps_test_apart(tmp_path, png_sample):
    counts = _three_split(tmp_path / "data", png_sample)
    ds = load_dataset(str(tmp_path / "data"))
    assert (len(ds.train), len(ds.val), len(ds.test)) == \
        (counts["train"], counts["val"], counts["test"])
    assert ds.val_name == "val" and ds.default_eval_split == "test"
    # A validation fraction is held out of train/; test/ is still kept apart.
    held = load_dataset(str(tmp_path / "data"), val_fraction=0.2)
    assert len(held.train) + len(held.val) == counts["train"]
    assert len(held.test) == counts["test"]


def test_eval_reports_the_test_split_by_default_and_any_split_on_request(tmp_path, png_sample,
                                                                        capsys):
    counts = _three_split(tmp_path / "data", png_sample)
    run = cnnkit.train(plots=False,
                       data=str(tmp_path / "data"), recipe="tutorial", model="seed-simple",
                       epochs=1, batch_size=8, out=str(tmp_path / "run"), log=lambda s: None)
    # Training validated on val/ only.
    assert json.loads((run.run_dir / "config.json").read_text())["num_val"] == counts["val"]
    expected = {None: ("test", counts["test"]), "test": ("test", counts["test"]),
                "val": ("val", counts["val"]), "train": ("train", counts["train"]),
                "all": ("all", sum(counts.values()))}
    for split, (name, n) in expected.items():
        record = cnnkit.evaluate(run.run_dir, split=split, device="cpu")
        assert (record["split"], record["num_images"]) == (name, n), split
    assert main(["eval", str(run.run_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("test accuracy ") and f"on {counts['test']} images" in first


def test_eval_on_a_two_split_folder_never_counts_training_images(tmp_path, png_sample):
    counts = _three_split(tmp_path / "data", png_sample)
    shutil.rmtree(tmp_path / "data" / "test")
    run = cnnkit.train(plots=False,
                       data=str(tmp_path / "data"), recipe="tutorial", model="seed-simple",
                       epochs=1, batch_size=8, out=str(tmp_path / "run"), log=lambda s: None)
    # The run's own data given again with --data: still its val split, not train + val.
    for data in (None, str(tmp_path / "data"), str(tmp_path / "data" / ".." / "data")):
        record = cnnkit.evaluate(run.run_dir, data, device="cpu")
        assert (record["split"], record["num_images"]) == ("val", counts["val"])
    with pytest.raises(CnnkitError, match="has no test split; choose --split"):
        cnnkit.evaluate(run.run_dir, split="test", device="cpu")


def test_a_run_finds_its_data_from_any_working_folder(tmp_path, png_sample, monkeypatch,
                                                      capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    shutil.copytree(png_sample, a / "imgs")
    monkeypatch.chdir(a)
    assert main(["train", "--data", "imgs", "--recipe", "tutorial", "--model", "seed-simple",
                 "--epochs", "1", "--out", "run1"]) == 0
    saved = json.loads((a / "run1" / "config.json").read_text())
    assert saved["data"] == "imgs" and saved["data_source"] == str(a / "imgs")
    capsys.readouterr()
    monkeypatch.chdir(b)
    assert main(["eval", "../a/run1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["split"] == "val" and record["num_images"] == 40
    assert main(["export", "../a/run1", "--format", "onnx", "--out", "m.onnx"]) == 0
    # The data moved away: one line naming the folder as typed and where it was looked for.
    capsys.readouterr()
    shutil.move(a / "imgs", a / "elsewhere")
    assert main(["eval", "../a/run1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"cnnkit: error: no such folder: imgs (looked in {a / 'imgs'}); the run's " \
                  "data has moved: pass --data PATH"


def test_a_missing_folder_is_named_not_called_an_unknown_data_set(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "imgs", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cnnkit: error: no such folder: imgs (looked in {tmp_path / 'imgs'})")
    assert "unknown data set" not in err and not (tmp_path / "runs").exists()


def test_greyscale_folder_trains_and_predicts_with_one_channel(tmp_path, png_sample):
    """--channels 1: images decode as greyscale (PIL's own luma), the model takes one
    channel, and predict converts colour inputs to it."""
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "grey" / c).mkdir(parents=True)
        for f in sorted((png_sample / c).glob("*.png"))[:12]:
            Image.open(f).convert("L").save(tmp_path / "grey" / c / f.name)
    ds = load_dataset(str(tmp_path / "grey"), channels=1)
    assert ds.in_channels == 1 and ds.train.images.shape[1:] == (1, 32, 32)
    assert load_dataset(str(png_sample), channels=1).in_channels == 1  # colour files
    first = sorted((png_sample / "cat").glob("*.png"))[0]
    luma = torch.from_numpy(np.array(Image.open(first).convert("L"))).float()
    assert (read_image(first, 32, channels=1)[0].float() - luma).abs().max() <= 1

    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "grey"), "--channels", "1", "--epochs",
                 "1", "--width", "8,16,16", "--out", str(run)]) == 0
    lm = cnnkit.load(run)
    assert lm.in_channels == 1 and json.loads((run / "config.json").read_text())[
        "channels"] == 1
    results = cnnkit.predict(run, [first, tmp_path / "grey" / "cat"])  # RGB and grey files
    assert len(results) == 13 and all(len(r["predictions"]) == 2 for r in results)


def test_channels_convert_the_built_in_sets_both_ways():
    from cnnkit.data import convert_channels
    digits = load_dataset("digits")
    assert digits.in_channels == 1
    rgb = load_dataset("digits", channels=3)
    assert rgb.in_channels == 3 and torch.equal(rgb.val.images[:, 1], digits.val.images[:, 0])
    assert torch.equal(convert_channels(rgb.val.images, 1), digits.val.images)  # grey in, grey out

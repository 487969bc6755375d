import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import load_dataset


def test_predict_on_png_sample_matches_the_model(png_run, png_sample):
    files = sorted(png_sample.rglob("*.png"))[:30]
    results = cnnkit.predict(png_run.run_dir, files, top_k=3, device="cpu")
    assert [r["file"] for r in results] == [str(f) for f in files]
    lm = cnnkit.load(png_run.run_dir)
    ds = load_dataset(str(png_sample), val_fraction=0.2)
    for r, f in zip(results, files):
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        # the same pixels through the model directly give the same top class
        x = torch.from_numpy(__import__("numpy").array(Image.open(f).convert("RGB")))
        with torch.no_grad():
            logits = lm.model(x.permute(2, 0, 1)[None].float() / 255)
        assert r["predictions"][0]["class"] == lm.classes[int(logits.argmax())]
        assert abs(r["predictions"][0]["probability"] - float(logits.softmax(1).max())) < 1e-5
    assert ds.classes == lm.classes


def test_predict_on_images_of_other_sizes_and_modes(png_run, tmp_path):
    Image.new("RGB", (1280, 960), (200, 30, 40)).save(tmp_path / "large.jpg")
    Image.new("L", (17, 300), 90).save(tmp_path / "tall_gray.png")
    Image.new("RGBA", (64, 48), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    pil = Image.new("RGB", (5, 5))
    results = cnnkit.predict(png_run.run_dir, [tmp_path / "large.jpg", tmp_path / "tall_gray.png",
                                               tmp_path / "alpha.png", pil], top_k=10,
                             device="cpu")
    for r in results:
        assert "error" not in r
        assert len(r["predictions"]) == 10
        assert abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-4


def test_unreadable_files_get_errors_and_the_rest_still_predicts(png_run, png_sample, tmp_path):
    good = sorted(png_sample.rglob("*.png"))[0]
    (tmp_path / "notes.jpg").write_text("hello")
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "dir.png").mkdir()
    files = [tmp_path / "missing.png", tmp_path / "notes.jpg", good, tmp_path / "trunc.png",
             tmp_path / "dir.png"]
    results = cnnkit.predict(png_run.run_dir, files, device="cpu")
    assert ["error" in r for r in results] == [True, True, False, True, True]
    assert results[0]["error"] == "no such file"
    assert results[2]["predictions"]


def test_predict_a_folder_tree_to_csv_agrees_with_eval(png_run, png_sample, tmp_path, capsys):
    from cnnkit.cli import main
    out = tmp_path / "p.csv"
    assert main(["predict", str(png_run.run_dir), str(png_sample), "--recursive", "--csv",
                 str(out), "--top-k", "2", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    files = sorted(png_sample.rglob("*.png"))
    assert [r["file"] for r in rows] == [str(f) for f in files]  # one row per file, in order
    assert list(rows[0]) == ["file", "predicted", "probability", "class_2", "probability_2",
                             "label", "error"]
    assert all(r["label"] == Path(r["file"]).parent.name for r in rows)
    right = sum(r["predicted"] == r["label"] for r in rows)
    # eval on the same 200 files (another batch size: allow one near-tie to fall either way)
    record = cnnkit.evaluate(png_run.run_dir, str(png_sample), split="all", device="cpu")
    assert record["num_images"] == 200
    assert abs(right - record["accuracy"] * 200) <= 1
    assert "on 200 images whose folder names their class" in printed
    # without --recursive a folder of class folders holds no images: said, non-zero exit
    assert main(["predict", str(png_run.run_dir), str(png_sample)]) == 1
    assert "--recursive" in capsys.readouterr().err
    # --csv never overwrites
    assert main(["predict", str(png_run.run_dir), str(png_sample), "--csv", str(out)]) == 2
    # the same table as a pandas DataFrame
    frame = cnnkit.predict(png_run.run_dir, [png_sample], recursive=True, top_k=2,
                           as_frame=True)
    assert list(frame.columns) == list(rows[0]) and len(frame) == 200
    assert list(frame["predicted"]) == [r["predicted"] for r in rows]
    # the CSV writes 6 decimals (half a unit: 5e-7); the frame's model runs again in this
    # process on the same batches: the same float32 sums
    assert frame["probability"].tolist() == pytest.approx(
        [float(r["probability"]) for r in rows], abs=1e-5)


def test_predict_a_glob_and_a_folder_with_a_broken_file(png_run, png_sample, tmp_path, capsys):
    from cnnkit.cli import main
    cats = sorted((png_sample / "cat").glob("*.png"))
    results = cnnkit.predict(png_run.run_dir, [str(png_sample / "cat" / "*.png")], device="cpu")
    assert [r["file"] for r in results] == [str(f) for f in cats]
    assert all(r["label"] == "cat" for r in results)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in cats[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(cats[0].read_bytes()[:50])
    (folder / "notes.txt").write_text("not an image: not read")
    (folder / "._cat.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's resource copy: hidden
    assert main(["predict", str(png_run.run_dir), str(folder)]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()  # the broken file named, one line
    assert len(errors) == 1 and errors[0].startswith(f"cnnkit: error: {folder / 'broken.png'}: ")
    assert len(captured.out.strip().splitlines()) == 3  # the readable ones still predicted

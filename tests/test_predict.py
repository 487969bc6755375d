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

"""Inside the network: summary, filters, feature maps, Grad-CAM."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.cli import main
from cnnkit.errors import CnnkitError
from cnnkit.explain import cam_layer, explain, features, filters, gradcam
from cnnkit.summary import summary
from cnnkit.transforms import to_input


def _nonblank(path, min_side=100):
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, im.size
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 5


@pytest.mark.parametrize("size,flat", [(32, 8192), (64, 32768)])
def test_summary_answers_what_reaches_the_flatten(size, flat):
    s = summary("seed-cnn", image_size=size)
    rows = {r["name"]: r for r in s["layers"]}
    assert rows["head.0"]["type"] == "Flatten" and rows["head.0"]["output_shape"] == [flat]
    model = cnnkit.create_model("seed-cnn", image_size=size)
    assert s["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(r["parameters"] for r in s["layers"]) == s["total_parameters"]
    assert (s["total_parameters"] == 4_210_090) == (size == 32)
    assert rows["features.0"]["output_shape"] == [32, size, size]


def test_summary_names_the_layer_where_the_shape_stops_fitting(png_run, capsys):
    with pytest.raises(CnnkitError, match=r"layer head\.1 \(Linear 2048→128\) has shape "
                                          r"\(1, 8192\)"):
        summary(str(png_run.run_dir), image_size=64)
    assert main(["summary", "seed-simple", "--image-size", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][6]["output_shape"] == [32 * 12 * 12]


def _squares(n, seed):
    """Class 0: a bright square in the left half; class 1: in the right half."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 32, 32, generator=g) * 60).to(torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        y = int(torch.randint(4, 22, (1,), generator=g))
        x = int(torch.randint(2, 8, (1,), generator=g)) + (16 if labels[i] else 0)
        images[i, :, y:y + 6, x:x + 6] = 255
    return images, labels


def test_gradcam_finds_the_evidence(tmp_path):
    images, labels = _squares(600, 0)
    for c in (0, 1):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "data" / f"c{lab}" / f"{i}.png")
    run = cnnkit.train(plots=False, data=str(tmp_path / "data"), model="fastnet", width="16,32,32",
                       recipe="fast-sgd", flip="none", epochs=8, batch_size=32,
                       out=str(tmp_path / "run"),
                       log=lambda s: None)  # a mirror would swap the classes
    assert run.metrics[-1]["val_acc"] > 0.9
    lm = cnnkit.load(run.run_dir)
    assert cam_layer(lm) == "blocks.1"  # the last stage with 7×7 maps, not the 3×3 one
    test_images, test_labels = _squares(40, 1)
    masses = []
    for img, lab in zip(test_images, test_labels):
        x = to_input(img[None], lm.mean, lm.std)
        heat = gradcam(lm, x, int(lab), "blocks.1")
        half = heat[:, 16:] if lab else heat[:, :16]
        masses.append(float(half.sum() / heat.sum().clamp_min(1e-12)))
    assert np.mean(masses) > 0.7, masses
    Image.fromarray(test_images[0].permute(1, 2, 0).numpy()).save(tmp_path / "t.png")
    r = explain(lm, [tmp_path / "t.png"], tmp_path / "cam")
    assert r[0]["layer"] == "blocks.1"
    _nonblank(r[0]["heatmap"])


def test_features_one_png_per_conv_layer_with_summary_channels(png_run, png_sample, tmp_path):
    image = sorted(png_sample.rglob("*.png"))[0]
    results = features(png_run.run_dir, image, tmp_path / "f")
    shapes = {r["name"]: r["output_shape"] for r in summary(str(png_run.run_dir))["layers"]}
    assert [r["layer"] for r in results] == ["features.0", "features.3"]
    for r in results:
        assert [r["channels"], r["height"], r["width"]] == shapes[r["layer"]]
        _nonblank(r["file"])
    assert json.loads((tmp_path / "f" / "features.json").read_text()) == results


def test_filters_and_bad_layer_names(png_run, tmp_path, capsys):
    r = filters(png_run.run_dir, tmp_path / "f.png")
    assert r["layer"] == "features.0" and r["shape"] == [16, 3, 3, 3]
    _nonblank(tmp_path / "f.png")
    r = filters(png_run.run_dir, tmp_path / "g.png", layer="features.3")
    assert r["shape"] == [32, 16, 3, 3]
    _nonblank(tmp_path / "g.png")
    code = main(["filters", str(png_run.run_dir), "--layer", "conv9", "--out",
                 str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "features.0, features.3" in err[0]
    code = main(["explain", str(png_run.run_dir), str(tmp_path / "missing.png"), "--out",
                 str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"cnnkit: error: {tmp_path / 'missing.png'}: no such file"]


def test_report_gains_filters_and_gradcam(png_run):
    for name in ("filters.png", "gradcam-worst.png"):
        _nonblank(png_run.run_dir / name)
    page = (png_run.run_dir / "report.html").read_text()
    assert "First-layer filters" in page and "Grad-CAM of the worst-classified" in page


def test_filters_says_which_layer_it_drew_when_the_first_is_not_a_conv(tmp_path):
    from cnnkit.checkpoint import LoadedModel, RunInfo
    stem = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 8, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 2))
    lm = LoadedModel(stem, RunInfo(cnnkit.Config(model="stem-net"), ["a", "b"], 3, (16, 16),
                                   [0.0] * 3, [1.0] * 3))
    r = filters(lm, tmp_path / "f.png")
    assert r["layer"] == "1" and "the first layer is 0, not a conv; drew 1" in r["note"]
    _nonblank(tmp_path / "f.png")

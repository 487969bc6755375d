"""A corpus of odd and hostile files through the image-folder loader and predict."""
import importlib.util
import resource
import shutil
import warnings

import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data import load_dataset, read_image
from cnnkit.errors import CnnkitError, CnnkitWarning
from conftest import ROOT

spec = importlib.util.spec_from_file_location("odd", ROOT / "scripts" / "make_odd_images.py")
odd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(odd)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd") / "odd"
    return folder, odd.make_corpus(folder)


def test_image_folder_loads_the_good_and_names_the_bad(corpus, tmp_path):
    folder, expected = corpus
    root = tmp_path / "data"
    shutil.copytree(folder, root / "odd", symlinks=True)
    (root / "plain").mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "plain" / "a.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(str(root), val_fraction=0.5, seed=0)
    ours = [w for w in caught if issubclass(w.category, CnnkitWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    for name, outcome in expected.items():
        assert (name in message) == (outcome == "skip"), name
    loaded = sum(v == "load" for v in expected.values())
    assert len(ds.train) + len(ds.val) == loaded + 1
    with pytest.raises(CnnkitError, match="bomb.png"):
        load_dataset(str(root), strict=True)


def test_predict_answers_every_odd_file(corpus, png_run):
    folder, expected = corpus
    names = sorted(expected)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = cnnkit.predict(png_run.run_dir, [folder / n for n in names], device="cpu")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - usage) / 1024
    assert grown_mb < 500  # the bomb was refused, not decoded (30000² would be 900 MB)
    for name, r in zip(names, results):
        if expected[name] == "skip":
            assert "error" in r and r["error"], name
        else:
            assert len(r["predictions"]) == 3, (name, r)
    bomb = results[names.index("bomb.png")]["error"]
    assert "decompression bomb" in bomb


def test_odd_files_decode_as_a_user_would_expect(corpus):
    folder, _ = corpus
    # EXIF rotation applied: the 40×20 stored image is shown 20 wide, 40 tall
    assert read_image(folder / "exif-rotated.jpg", None).shape == (3, 40, 20)
    # 16-bit greys keep their range instead of clipping to white
    sixteen = read_image(folder / "sixteen-bit.png", None)
    assert sixteen.min() < 10 and sixteen.max() > 245 and 100 < sixteen.float().mean() < 155
    # CMYK red becomes RGB red
    r, g, b = read_image(folder / "cmyk.jpg", None).float().mean((1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60
    # transparent palette pixels composite onto white, opaque ones keep their colour
    pal = read_image(folder / "palette-transparent.png", None)
    assert pal[:, 0, 15].tolist() == [255, 255, 255] and pal[:, 0, 0].tolist() == [0, 0, 255]
    # the first frame of an animation (red)
    assert read_image(folder / "animated.gif", None)[:, 5, 5].tolist()[0] > 200
    assert read_image(folder / "one-pixel.png", 32).shape == (3, 32, 32)
    assert read_image(folder / "large-4000x3000.jpg", 32).shape == (3, 32, 32)
    assert torch.equal(read_image(folder / "link-to-good.png", 8),
                       read_image(folder / "name with spaces.png", 8))

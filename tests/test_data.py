import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import load_dataset, read_image, resize_images
from cnnkit.errors import CnnkitError, CnnkitWarning, DownloadError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _raw_labels(folder):
    labels = []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            labels += pickle.load(f, encoding="latin1")["labels"]
    return np.array(labels)


def test_cifar_subset_loads_with_a_stratified_validation_split(cifar_subset):
    ds = load_dataset(str(cifar_subset), val_fraction=0.2, seed=0)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.val_name == "val"
    assert len(ds.train) + len(ds.val) == 5085
    assert ds.train.images.shape[1:] == (3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64
    raw = _raw_labels(cifar_subset)
    all_labels = torch.cat([ds.train.labels, ds.val.labels]).numpy()
    assert np.array_equal(np.bincount(all_labels), np.bincount(raw))
    # Each class is held out in proportion (stratified).
    frac = np.bincount(ds.val.labels.numpy()) / np.bincount(raw)
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # Same seed, same split; another seed, another split.
    again = load_dataset(str(cifar_subset), val_fraction=0.2, seed=0)
    other = load_dataset(str(cifar_subset), val_fraction=0.2, seed=1)
    assert torch.equal(again.val.images, ds.val.images)
    assert not torch.equal(other.val.labels, ds.val.labels)


def test_cifar_pixels_are_the_official_layout(cifar_subset):
    ds = load_dataset(str(cifar_subset), val_fraction=0.2, seed=0)
    with open(cifar_subset / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="latin1")["data"][0]
    expected = torch.from_numpy(first.reshape(3, 32, 32))
    found = (torch.cat([ds.train.images, ds.val.images]) == expected).flatten(1).all(1)
    assert found.any()


def test_parent_folder_of_the_cifar_copy_is_found(cifar_subset):
    ds = load_dataset(str(cifar_subset.parent), val_fraction=0.5)
    assert ds.classes == CIFAR10_CLASSES and len(ds.train) + len(ds.val) == 5085


def test_png_sample_loads_as_an_image_folder(png_sample):
    ds = load_dataset(str(png_sample), val_fraction=0.2, seed=0)
    assert ds.classes == CIFAR10_CLASSES
    assert len(ds.train) + len(ds.val) == 200
    assert ds.train.images.shape[1:] == (3, 32, 32)
    counts = np.bincount(torch.cat([ds.train.labels, ds.val.labels]).numpy(), minlength=10)
    expected = [len(list((png_sample / c).glob("*.png"))) for c in CIFAR10_CLASSES]
    assert counts.tolist() == expected
    # An image's pixels are the file's pixels.
    one = read_image(sorted((png_sample / "cat").glob("*.png"))[0], 32)
    assert torch.equal(one, torch.from_numpy(np.array(Image.open(
        sorted((png_sample / "cat").glob("*.png"))[0]).convert("RGB"))).permute(2, 0, 1))


def _small_folder(tmp_path, png_sample):
    for c in ("cat", "dog"):
        shutil.copytree(png_sample / c, tmp_path / c)
    return tmp_path


def test_image_folder_with_corrupt_grayscale_and_rgba_files(tmp_path, png_sample):
    root = _small_folder(tmp_path, png_sample)
    n_files = len(list(root.rglob("*.png")))
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    Image.new("L", (50, 40), 128).save(root / "dog" / "gray.png")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.save(root / "dog" / "rgba.webp", lossless=True)
    (root / "dog" / "notes.txt").write_text("not an image, ignored by extension")
    with pytest.warns(CnnkitWarning, match="corrupt.png") as record:
        ds = load_dataset(str(root), val_fraction=0.25, image_size=24, seed=0)
    assert len(record) == 1
    assert len(ds.train) + len(ds.val) == n_files + 2
    assert ds.train.images.shape[1:] == (3, 24, 24)
    allimg = torch.cat([ds.train.images, ds.val.images])
    # the grayscale file became a grey RGB image; the RGBA one pure red
    assert (allimg == 128).flatten(1).all(1).any()
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 24, 24)
    assert (allimg == red).flatten(1).all(1).any()
    with pytest.raises(CnnkitError, match="corrupt.png"):
        load_dataset(str(root), strict=True)


def test_folder_errors(tmp_path):
    with pytest.raises(CnnkitError, match="no class subfolders"):
        load_dataset(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(CnnkitError, match="no images.*: b"):
        load_dataset(str(tmp_path))
    with pytest.raises(CnnkitError, match=f"no such folder: .*missing \\(looked in "
                       f"{tmp_path / 'missing'}\\)"):
        load_dataset(str(tmp_path / "missing"))


def test_digits_load_offline():
    ds = load_dataset("digits", val_fraction=0.2, seed=0)
    assert len(ds.train) + len(ds.val) == 1797
    assert ds.train.images.shape[1:] == (1, 8, 8)
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.train.images.max() == 255
    big = load_dataset("digits", image_size=16)
    assert big.train.images.shape[1:] == (1, 16, 16)


def test_download_offline_is_one_clear_error(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DownloadError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(e.value)
    assert "could not download cifar10" in message and "--data PATH" in message
    assert "\n" not in message
    assert time.perf_counter() - start < 30


def test_hostile_cifar_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a"]}, f)
    with pytest.raises(CnnkitError, match="not a readable CIFAR batch"):
        load_dataset(str(folder))
    assert not marker.exists()


def test_large_image_of_any_mode_is_fitted(tmp_path):
    Image.new("RGB", (1000, 700), (10, 200, 30)).save(tmp_path / "big.jpg")
    x = read_image(tmp_path / "big.jpg", 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    Image.new("P", (40, 90)).save(tmp_path / "pal.gif")
    assert read_image(tmp_path / "pal.gif", (16, 20)).shape == (3, 16, 20)
    assert read_image(tmp_path / "pal.gif", 8, channels=1).shape == (1, 8, 8)


def test_resize_images_keeps_uint8_and_constant_images():
    x = torch.full((3, 1, 8, 8), 77, dtype=torch.uint8)
    y = resize_images(x, 20)
    assert y.dtype == torch.uint8 and y.shape == (3, 1, 20, 20) and (y == 77).all()

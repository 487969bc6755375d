"""Data sets of real users: split folders, CSV listings, streaming from disk."""
import shutil

import pytest
import torch

import cnnkit
from cnnkit.data import Split, StreamSplit, load_dataset
from cnnkit.engine import batch_order
from cnnkit.errors import CnnkitError


def test_streaming_gives_the_same_batches_as_memory(png_sample):
    mem = load_dataset(str(png_sample), image_size=24, val_fraction=0.2, seed=3, stream=False)
    disk = load_dataset(str(png_sample), image_size=24, val_fraction=0.2, seed=3, stream=True)
    assert isinstance(mem.train, Split) and isinstance(disk.train, StreamSplit)
    assert torch.equal(mem.train.labels, disk.train.labels)
    assert torch.equal(mem.val.images, disk.val.images)
    batches = batch_order(len(mem.train), 32, torch.Generator().manual_seed(5))
    pairs = zip(mem.train.iterate(batches, "cpu"), disk.train.iterate(batches, "cpu"))
    n = 0
    for (i1, x1, y1), (i2, x2, y2) in pairs:
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)
        n += len(y1)
    assert n == len(mem.train)


def test_streaming_is_picked_over_the_memory_budget_and_trains(png_sample, tmp_path):
    lines = []
    result = cnnkit.train(plots=False,
                          data=str(png_sample), epochs=2, width="8,16,16", max_memory=1e-4,
                          out=str(tmp_path / "r"), log=lines.append)
    assert any(line.startswith("streaming the images from disk") for line in lines)
    assert len(result.metrics) == 2
    same = cnnkit.train(plots=False, data=str(png_sample), epochs=2, width="8,16,16",
                        out=str(tmp_path / "m"), log=lambda s: None)
    # the same images, batches and steps, decoded in workers or held in memory: the same
    # computations in this process, but workers hand over batches as other tensors (their
    # memory layout can change which kernel sums them): equal to float32 rounding
    assert [m["train_loss"] for m in same.metrics] == \
        pytest.approx([m["train_loss"] for m in result.metrics], rel=1e-5)


def _tree(root, layout):
    from PIL import Image
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (i * 20, 40, 90)).save(root / split / c / f"{i}.png")


def test_train_and_val_folders_are_used_as_given(tmp_path):
    _tree(tmp_path, {"train": {"a": 6, "b": 4}, "val": {"a": 2, "b": 3}})
    ds = load_dataset(str(tmp_path), image_size=16)
    assert ds.classes == ["a", "b"] and ds.val_name == "val"
    assert len(ds.train) == 10 and len(ds.val) == 5
    assert ds.val.labels.tolist() == [0, 0, 1, 1, 1]
    shutil.rmtree(tmp_path / "val")
    _tree(tmp_path, {"val": {"c": 1}})
    with pytest.raises(CnnkitError, match="classes that train/ does not: c"):
        load_dataset(str(tmp_path))


def test_csv_of_paths_and_labels(tmp_path, png_sample):
    rows = ["path,label"]
    for c in ("cat", "dog"):
        for f in sorted((png_sample / c).glob("*.png"))[:5]:
            shutil.copy(f, tmp_path / f"{c}-{f.name}")
            rows.append(f"{c}-{f.name},{c}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(tmp_path / "list.csv"), val_fraction=0.2, seed=0)
    assert ds.classes == ["cat", "dog"] and len(ds.train) + len(ds.val) == 10
    (tmp_path / "bad.csv").write_text("only-a-path.png\n")
    with pytest.raises(CnnkitError, match="expected rows of path,label"):
        load_dataset(str(tmp_path / "bad.csv"))

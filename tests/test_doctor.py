"""`cnnkit doctor`: label errors, duplicates and leaks in a data set (issue "9 of 9")."""
import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.doctor import duplicate_pairs, label_issues

QUICK = dict(model="seed-simple", recipe="tutorial", epochs=3, batch_size=16, lr=0.01,
             progress=False, log=lambda s: None)


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, png_sample):
    """The PNG sample as train/ and val/ folders, with planted problems: an exact copy and
    a resized JPEG copy of training images in val/, and two images in a wrong class."""
    root = tmp_path_factory.mktemp("doctor") / "data"
    rng = np.random.default_rng(0)
    files = sorted(png_sample.rglob("*.png"))
    for k, f in enumerate(files):
        split = "val" if k % 5 == 0 else "train"
        (root / split / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / split / f.parent.name / f.name).write_bytes(f.read_bytes())
    train = sorted((root / "train").rglob("*.png"))
    a, b = train[3], train[40]
    (root / "val" / a.parent.name / "copy-exact.png").write_bytes(a.read_bytes())
    with Image.open(b) as im:
        im.resize((64, 64), Image.BICUBIC).save(root / "val" / b.parent.name / "copy.jpg",
                                                quality=85)
    moved = []
    for f in rng.choice(train[50:], 2, replace=False):
        other = "cat" if f.parent.name != "cat" else "dog"
        target = root / "train" / other / f"moved-{f.name}"
        f.rename(target)
        moved.append(target)
    return root, (a, root / "val" / a.parent.name / "copy-exact.png"), \
        (b, root / "val" / b.parent.name / "copy.jpg"), moved


def test_doctor_finds_planted_leaks_writes_its_findings_and_leaves_the_data(planted, tmp_path):
    root, exact, near, _ = planted
    before = _tree_digest(root)
    r = cnnkit.doctor(str(root), folds=2, out=tmp_path / "doc", fix=True, seed=0, **QUICK)
    assert _tree_digest(root) == before  # only read
    n = len(list(root.rglob("*.png"))) + len(list(root.rglob("*.jpg")))
    assert r.probs.shape == (n, 10)
    assert torch.allclose(r.probs.sum(1), torch.ones(n), atol=1e-5)

    pairs = {frozenset((p["image"], p["other"])): p for p in r.duplicates}
    found = pairs[frozenset(map(str, exact))]
    assert found["kind"] == "exact" and found["leak"] and not found["conflict"]
    assert frozenset(map(str, near)) in pairs  # resized and re-encoded: features still match
    assert pairs[frozenset(map(str, near))]["leak"]

    # findings.csv: one row per label issue and per pair, in the ranked order
    with open(r.out / "findings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    issues = [row for row in rows if row["finding"] == "label_issue"]
    assert [row["image"] for row in issues] == [i["image"] for i in r.label_issues]
    assert len(rows) - len(issues) == len(r.duplicates)
    assert any(row["finding"] == "exact_duplicate_leak" and {row["image"], row["other_image"]}
               == set(map(str, exact)) for row in rows)
    summary = json.loads((r.out / "doctor.json").read_text())["summary"]
    assert summary["images"] == n and summary["folds"] == 2
    assert summary["exact_duplicate_pairs"] >= 1 and summary["leaks"] >= 2
    page = r.report.read_text()
    for section in ("Likely label errors", "Duplicates", "Class balance", "Classes"):
        assert f"<h2>{section}" in page
    assert page.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in (r.out / "folds").iterdir()) == ["fold-1", "fold-2"]

    # --fix: a listing of the unflagged images that trains
    with open(r.clean, newline="") as f:
        listed = list(csv.reader(f))[1:]
    flagged = {i["image"] for i in r.label_issues} | {p["other"] for p in r.duplicates}
    assert {p for p, _ in listed} == {str(p) for p in root.rglob("*") if p.is_file()} - flagged
    assert all(os.path.basename(os.path.dirname(p)) == label for p, label in listed)
    run = cnnkit.train(plots=False, data=str(r.clean), out=str(tmp_path / "clean-run"), **QUICK)
    assert run.metrics and len(run.metrics) == 3


def test_doctor_on_a_source_without_files_writes_the_kept_images(tmp_path):
    r = cnnkit.doctor("digits", folds=2, out=tmp_path / "doc", fix=True, seed=0, **QUICK)
    with open(r.clean, newline="") as f:
        listed = list(csv.reader(f))[1:]
    assert 0 < len(listed) <= 1797 - len(r.label_issues)
    path, label = listed[0]
    assert path.startswith(str(r.out / "images")) and label == os.path.basename(
        os.path.dirname(path))
    with Image.open(path) as im:
        assert im.size == (8, 8)
    # every image was predicted by a model that did not train on it, and most correctly
    assert r.accuracy > 0.5


def test_label_issues_are_the_confidently_contradicted_labels_worst_first():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(100)
    probs = torch.full((300, 3), 0.05)
    probs[torch.arange(300), labels] = 0.9
    probs += 0.02 * torch.rand(300, 3, generator=g)
    wrong = {7: (2, 0.97), 50: (0, 0.95), 200: (1, 0.99)}  # index: (class it looks like, p)
    for i, (c, p) in wrong.items():
        probs[i] = (1 - p) / 2
        probs[i, c] = p
    probs /= probs.sum(1, keepdim=True)
    found = label_issues(labels, probs)
    assert set(found) == set(wrong)
    assert found == sorted(wrong, key=lambda i: float(probs[i, labels[i]]))


def test_duplicate_pairs_exact_by_hash_near_by_features_or_thumbnails():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[3] = images[0]
    # image 5: image 2 brightened a little, its features unrelated
    images[5] = (images[2].float() * 0.9 + 20).round().to(torch.uint8)
    f = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    f[4] = torch.nn.functional.normalize(f[1] + 0.05 * f[2], dim=0)
    near = float(f[1] @ f[4])
    pairs = duplicate_pairs(images, f, threshold=near - 1e-3, pixel_threshold=0.99)
    assert [(p["kind"], p["a"], p["b"]) for p in pairs] == [
        ("exact", 0, 3), ("near", 2, 5), ("near", 1, 4)]
    assert pairs[1]["pixel_similarity"] > 0.99 > pairs[2]["pixel_similarity"]
    assert abs(pairs[2]["feature_similarity"] - near) < 1e-6
    only_exact = duplicate_pairs(images, f, threshold=near + 1e-3, pixel_threshold=1.01)
    assert [(p["kind"], p["a"], p["b"]) for p in only_exact] == [("exact", 0, 3)]


def test_doctor_errors_are_one_line(tmp_path, png_sample, capsys, monkeypatch):
    from cnnkit.cli import main
    listing = tmp_path / "multi.csv"
    listing.write_text("".join(f"{f},{f.parent.name}|thing\n"
                               for f in sorted(png_sample.rglob("*.png"))))
    monkeypatch.chdir(tmp_path)
    assert main(["doctor", str(listing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multi-label" in err, err
    for args, message in [
            (["--folds", "1"], "--folds must be at least 2"),
            (["--folds", "30"], "have fewer images than --folds 30"),
            (["--similarity", "1.5"], "--similarity is a cosine similarity")]:
        assert main(["doctor", str(png_sample), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()

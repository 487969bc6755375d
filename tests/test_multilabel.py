"""Multi-label classification: a CSV of label sets (`cat|animal`), sigmoid outputs and binary
cross-entropy, mAP and per-label F1 (held to scikit-learn's), per-label thresholds saved
with the run, and predict, export and serve that carry them."""
import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

import cnnkit
from cnnkit.checkpoint import load_onnx
from cnnkit.cli import main
from cnnkit.data import load_dataset
from cnnkit.engine import evaluate_split
from cnnkit.export import export
from cnnkit.metrics import (average_precision, best_thresholds, evaluation_record,
                            mean_average_precision)
from cnnkit.serve import create_app

VEHICLES = {"airplane", "automobile", "ship", "truck"}


def _write_csv(path, png_sample, sets=True):
    """Each PNG with its class and, with `sets`, a second label: vehicle or animal."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted(png_sample.rglob("*.png")):
            c = p.parent.name
            w.writerow([p, f"{c}|{'vehicle' if c in VEHICLES else 'animal'}" if sets else c])
    return path


@pytest.fixture(scope="module")
def ml_csv(tmp_path_factory, png_sample):
    return _write_csv(tmp_path_factory.mktemp("ml") / "labels.csv", png_sample)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory, ml_csv):
    out = tmp_path_factory.mktemp("runs") / "ml-run"
    return cnnkit.train(data=str(ml_csv), recipe="tutorial", model="seed-simple", epochs=3,
                        batch_size=32, lr=0.05, out=str(out), seed=0, log=lambda s: None)


def test_a_csv_of_label_sets_loads_as_multi_hot_rows(ml_csv, png_sample, tmp_path):
    ds = load_dataset(str(ml_csv), seed=0)
    classes = sorted({p.name for p in png_sample.iterdir()} | {"animal", "vehicle"})
    assert ds.multi_label and ds.classes == classes
    assert ds.train.labels.dtype == torch.float32 and ds.train.labels.shape == (160, 12)
    assert (ds.train.labels.sum(1) == 2).all() and (ds.val.labels.sum(1) == 2).all()
    for split in (ds.train, ds.val):  # each row is its file's class and kind
        for f, row in zip(split.files, split.labels):
            names = {classes[k] for k in row.nonzero().flatten().tolist()}
            kind = "vehicle" if f.parent.name in VEHICLES else "animal"
            assert names == {f.parent.name, kind}
    # the held-out split is stratified (by each row's rarest label: its class), and the
    # same for the same seed
    own = [classes.index(c) for c in classes if c not in ("animal", "vehicle")]
    held = ds.val.labels[:, own].sum(0)
    total = ds.train.labels[:, own].sum(0) + held
    assert ((held - 0.2 * total).abs() <= 1).all(), (held, total)
    assert load_dataset(str(ml_csv), seed=0).val.files == ds.val.files
    assert load_dataset(str(ml_csv), seed=1).val.files != ds.val.files
    # one label per row: single-label, unless asked
    single = _write_csv(tmp_path / "single.csv", png_sample, sets=False)
    assert load_dataset(str(single)).train.labels.dtype == torch.int64
    forced = load_dataset(str(single), multi_label=True)
    assert forced.multi_label and (forced.train.labels.sum(1) == 1).all()


def _random_case(seed, n=300, k=5, ties=False):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, k, generator=g) < torch.linspace(0.05, 0.6, k)).float()
    probs = (0.4 * labels + 0.6 * torch.rand(n, k, generator=g)).clamp(0, 1)
    if ties:  # many images share a score: sklearn's curves take them together
        probs = (probs * 8).round() / 8
    labels[:, -1] = 0  # a label no image has: no AP, left out of mAP
    return probs, labels


@pytest.mark.parametrize("ties", [False, True])
def test_map_and_f1_equal_scikit_learns(ties):
    probs, labels = _random_case(1 + ties, ties=ties)
    y, p = labels.numpy().astype(int), probs.numpy()
    mean_ap, aps = mean_average_precision(probs, labels)
    want = [average_precision_score(y[:, k], p[:, k]) for k in range(4)]
    assert aps[4] is None and average_precision(probs[:, 4], labels[:, 4]) is None
    assert np.allclose(aps[:4], want, atol=1e-6, rtol=0)
    assert abs(mean_ap - np.mean(want)) < 1e-6
    thresholds = best_thresholds(probs, labels)
    assert thresholds[4] == 0.5
    record = evaluation_record(None, 0.0, list("abcde"), "x", "val", probs, labels, thresholds)
    called = (p >= np.array(thresholds, dtype=np.float32)).astype(int)
    f1 = f1_score(y, called, average=None, zero_division=0)
    precision = precision_score(y, called, average=None, zero_division=0)
    recall = recall_score(y, called, average=None, zero_division=0)
    for i, c in enumerate("abcde"):
        m = record["per_label"][c]
        assert abs(m["f1"] - f1[i]) < 1e-6 and abs(m["precision"] - precision[i]) < 1e-6
        assert abs(m["recall"] - recall[i]) < 1e-6 and m["support"] == y[:, i].sum()
    assert abs(record["accuracy"] - (called == y).mean()) < 1e-9
    assert abs(record["exact_match"] - (called == y).all(1).mean()) < 1e-9
    # each threshold gives the best F1 that any cut of the scores gives
    for k in range(4):
        best = max(f1_score(y[:, k], (p[:, k] >= t).astype(int), zero_division=0)
                   for t in np.unique(p[:, k]))
        assert abs(f1[k] - best) < 1e-9


def test_training_uses_bce_records_map_and_saves_thresholds(ml_run):
    rows = ml_run.metrics
    assert len(rows) == 3 and all(0 <= r["val_map"] <= 1 for r in rows)
    # summed over 12 labels: an untrained model starts near 12·ln 2, and the loss falls
    assert 0.5 * 12 * math.log(2) < rows[0]["train_loss"] < 1.5 * 12 * math.log(2)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    header = (ml_run.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "val_map" in header.split(",")
    best = torch.load(ml_run.run_dir / "best.pt", weights_only=True)
    assert best["metrics"]["val_map"] == max(r["val_map"] for r in rows)  # picked by mAP
    lm = cnnkit.load(ml_run.run_dir)
    assert lm.multi_label and lm.thresholds == best["thresholds"]
    assert len(lm.thresholds) == 12 and all(0 <= t < 1 for t in lm.thresholds)
    # the saved thresholds are those of the best F1 on the validation probabilities
    ds = lm.info.load_data()
    ev = evaluate_split(lm.model, ds.val, mean=lm.mean, std=lm.std,
                        runtime=cnnkit.device.select_runtime("cpu"), num_classes=12)
    assert np.allclose(ev.thresholds, lm.thresholds, atol=1e-6)
    assert abs(ev.mean_ap - best["metrics"]["val_map"]) < 1e-6
    # cnnkit eval: the same numbers, and scikit-learn's on the same probabilities
    record = cnnkit.evaluate(ml_run.run_dir, device="cpu")
    y, p = ds.val.labels.numpy().astype(int), ev.probs.numpy()
    present = [k for k in range(12) if y[:, k].any()]
    want = np.mean([average_precision_score(y[:, k], p[:, k]) for k in present])
    assert abs(record["mean_average_precision"] - want) < 1e-6
    called = (p >= np.array(lm.thresholds, dtype=np.float32)).astype(int)
    f1 = f1_score(y, called, average=None, zero_division=0)
    assert np.allclose([record["per_label"][c]["f1"] for c in lm.classes], f1, atol=1e-6)
    assert abs(record["accuracy"] - best["metrics"]["val_acc"]) < 1e-9
    report = (ml_run.run_dir / "report.html").read_text()
    assert "mAP" in report and "threshold" in report
    assert not (ml_run.run_dir / "confusion.png").exists()


def test_predict_and_the_onnx_export_give_the_same_labels(ml_run, png_sample, tmp_path):
    out = export(ml_run.run_dir, tmp_path / "m.onnx")
    lm, onnx = cnnkit.load(ml_run.run_dir), load_onnx(out)
    assert onnx.multi_label and onnx.thresholds == pytest.approx(lm.thresholds, abs=0)
    files = sorted(png_sample.rglob("*.png"))[::4]
    from_run = cnnkit.predict(ml_run.run_dir, files, device="cpu")
    from_onnx = cnnkit.predict(out, files, device="cpu")
    called = 0
    for a, b in zip(from_run, from_onnx):
        for r in (a, b):  # labels are exactly those at or over their thresholds
            want = [c for c, t in zip(lm.classes, lm.thresholds) if r["probabilities"][c] >= t]
            assert sorted(r["labels"]) == sorted(want)
        # float32 in two runtimes: only a probability within rounding of its threshold may
        # fall on the other side
        close = {c for c, t in zip(lm.classes, lm.thresholds)
                 if abs(a["probabilities"][c] - t) < 1e-4}
        assert set(a["labels"]) - close == set(b["labels"]) - close
        assert all(abs(a["probabilities"][c] - b["probabilities"][c]) < 1e-4
                   for c in lm.classes)
        called += len(a["labels"])
    assert called > 0


def test_int8_export_of_a_multi_label_model_measures_its_label_calls(ml_run, tmp_path):
    from cnnkit.checkpoint import OnnxModel
    out = export(ml_run.run_dir, tmp_path / "q.onnx", int8=True, max_drop=100)
    report = OnnxModel(out).meta["int8"]
    assert report["per"] == "label" and report["images"] == 40
    # the float model's accuracy over the 40 × 12 calls is the run's own val_acc
    best = cnnkit.load(ml_run.run_dir).metrics["val_acc"]
    assert abs(report["float_accuracy"] - best) <= 1 / 480 + 1e-9
    assert 0 <= report["int8_accuracy"] <= 1 and 0 <= report["agreement"] <= 1
    assert load_onnx(out).thresholds == cnnkit.load(ml_run.run_dir).thresholds


def test_serve_answers_with_the_labels(ml_run, png_run, png_sample):
    from fastapi.testclient import TestClient
    image = sorted(png_sample.rglob("*.png"))[0]
    with TestClient(create_app(ml_run.run_dir, device="cpu")) as client:
        info = client.get("/model").json()
        assert info["multi_label"] and len(info["thresholds"]) == 12
        got = client.post("/predict", files=[("files", ("a.png", image.read_bytes()))]).json()
    want = cnnkit.predict(ml_run.run_dir, [image], device="cpu")[0]
    assert set(got[0]["labels"]) == set(want["labels"])
    with TestClient(create_app(png_run.run_dir, device="cpu")) as client:  # single-label
        got = client.post("/predict", files=[("files", ("a.png", image.read_bytes()))]).json()
        assert set(got[0]) == {"file", "predictions"}
        assert client.get("/model").json()["multi_label"] is False


def test_cli_trains_a_single_label_csv_as_multi_label_evaluates_and_predicts(
        png_sample, tmp_path, capsys):
    single = _write_csv(tmp_path / "single.csv", png_sample, sets=False)
    run = tmp_path / "run"
    assert main(["train", "--data", str(single), "--multi-label", "--model", "seed-simple",
                 "--recipe", "tutorial", "--epochs", "2", "--batch-size", "32",
                 "--out", str(run)]) == 0
    assert "mAP" in capsys.readouterr().out
    lm = cnnkit.load(run)
    assert lm.multi_label and lm.config.multi_label and len(lm.classes) == 10
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "val mAP" in printed and "threshold" in printed and "airplane" in printed
    out = tmp_path / "p.csv"
    files = [str(p) for p in sorted(png_sample.rglob("*.png"))[:10]]
    assert main(["predict", str(run), *files, "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[:3] == ["file", "labels", "predicted"] and len(rows) == 10
    assert all(set(filter(None, r["labels"].split("|"))) <= set(lm.classes) for r in rows)
    assert main(["predict", str(run), *files[:2]]) == 0
    assert capsys.readouterr().out.count(".png: ") == 2


def test_multi_label_needs_a_csv_and_one_class_settings_refuse(png_sample, ml_csv, capsys):
    p = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--data", str(png_sample),
                        "--multi-label"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "not a CSV" in p.stderr
    assert main(["train", "--data", str(ml_csv), "--balance", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--balance" in err[0] and "multi-label" in err[0]

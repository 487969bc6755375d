"""ONNX and TorchScript exports: dynamic batch, normalization inside, verified on writing."""
import importlib
import json

import numpy as np
import onnxruntime
import pytest
import torch

import cnnkit
from cnnkit.cli import main
from cnnkit.errors import CnnkitError
from cnnkit.export import export
from cnnkit.transforms import to_input


def _pixels(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_onnx_export_matches_pytorch_with_any_batch(png_run, tmp_path):
    out = export(png_run.run_dir, tmp_path / "m.onnx", fmt="onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    lm = cnnkit.load(png_run.run_dir)
    assert json.loads(meta["classes"]) == lm.classes
    assert json.loads(meta["input_size"]) == [3, 32, 32]
    for n in (1, 7):
        x = _pixels(n, n)
        got = session.run(None, {"pixels": x.numpy()})[0]
        with torch.no_grad():
            want = lm.model(to_input(x, lm.mean, lm.std)).numpy()
        assert got.shape == (n, 10) and np.abs(got - want).max() < 1e-4


def test_torchscript_export_matches_pytorch(png_run, tmp_path):
    import warnings
    out = export(png_run.run_dir, tmp_path / "m.ts", fmt="torchscript")
    extra = {"cnnkit.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["cnnkit.json"])["classes"] == cnnkit.load(png_run.run_dir).classes
    lm = cnnkit.load(png_run.run_dir)
    x = _pixels(5)
    with torch.no_grad():
        assert (ts(x) - lm.model(to_input(x, lm.mean, lm.std))).abs().max() < 1e-4


def test_predict_with_onnx_prints_what_the_run_prints(png_run, png_sample, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(png_run.run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    images = [str(p) for p in sorted(png_sample.rglob("*.png"))[:6]]
    assert main(["predict", str(out), *images, "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert main(["predict", str(png_run.run_dir), *images, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    for a, b in zip(from_onnx, from_run):
        # The best class's probability agrees; ranks below it may swap on near-ties
        # between two runtimes, so each class is looked up by name.
        top = a["predictions"][0]
        assert top["probability"] == pytest.approx(b["predictions"][0]["probability"],
                                                   abs=1e-5)
        theirs = {p["class"]: p["probability"] for p in b["predictions"]}
        assert all(p["probability"] == pytest.approx(theirs[p["class"]], abs=1e-5)
                   for p in a["predictions"] if p["class"] in theirs)


def test_an_export_that_does_not_match_fails_naming_the_difference(png_run, tmp_path,
                                                                   monkeypatch):
    ex = importlib.import_module("cnnkit.export")
    real = ex.load_exported

    def off_by_a_bit(path, fmt):
        model = real(path, fmt)
        return lambda x: model(x) + 0.01
    monkeypatch.setattr(ex, "load_exported", off_by_a_bit)
    with pytest.raises(CnnkitError, match=r"largest difference 0\.01"):
        export(png_run.run_dir, tmp_path / "bad.onnx", fmt="onnx")
    assert not (tmp_path / "bad.onnx").exists()

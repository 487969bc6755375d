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
        # between two runtimes, so each class is looked up by name. Two runtimes' float32
        # kernels differ in summation order: logits by about 1e-6 relative (export
        # verifies 1e-4 on writing), so a probability, whose derivative in a logit is at
        # most 1/4, moves by far less than 1e-5.
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


def test_int8_export_is_quantized_measured_and_refused_past_its_threshold(png_run, png_sample,
                                                                         tmp_path, capsys):
    import onnx
    out = tmp_path / "q.onnx"
    assert main(["export", str(png_run.run_dir), "--out", str(out), "--int8",
                 "--max-drop", "100"]) == 0
    printed = capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)

    # The accuracy it reports is the file's own on the run's validation images.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    report = json.loads(session.get_modelmeta().custom_metadata_map["int8"])
    lm = cnnkit.load(png_run.run_dir)
    val = lm.info.load_data().val
    images, labels = val.head(len(val)), val.subset(range(len(val))).labels
    right = (session.run(None, {"pixels": images.numpy()})[0].argmax(1) == labels.numpy())
    assert report["images"] == len(val) and report["int8_accuracy"] == right.mean()
    with torch.no_grad():
        float_right = (lm.model(to_input(images, lm.mean, lm.std)).argmax(1) == labels)
    # onnxruntime's float and PyTorch may split a near-tie differently: one image at most
    assert abs(report["float_accuracy"] - float(float_right.float().mean())) <= 1 / len(val)
    assert f"drop {report['drop_points']:.2f} points" in printed

    # The same export with a threshold just under its drop is refused and leaves nothing.
    refused = tmp_path / "refused.onnx"
    assert main(["export", str(png_run.run_dir), "--out", str(refused), "--int8",
                 "--max-drop", f"{report['drop_points'] - 0.01:.4f}"]) == 1
    err = capsys.readouterr().err
    assert "int8 export refused" in err and f"{report['float_accuracy']:.4f}" in err
    assert not refused.exists() and not list(tmp_path.glob("refused*"))

    # predict and serve take the int8 file
    paths = sorted(png_sample.rglob("*.png"))[:4]
    results = cnnkit.predict(out, paths, top_k=3)
    assert [r["file"] for r in results] == [str(p) for p in paths]
    assert all(0 < r["predictions"][0]["probability"] <= 1 for r in results)
    from fastapi.testclient import TestClient
    from cnnkit.serve import create_app
    with TestClient(create_app(out)) as client:
        r = client.post("/predict", files=[("files", (p.name, p.read_bytes())) for p in paths])
    assert r.status_code == 200
    assert [a["predictions"][0]["class"] for a in r.json()] == \
        [b["predictions"][0]["class"] for b in results]


def test_int8_needs_onnx(png_run, tmp_path, capsys):
    assert main(["export", str(png_run.run_dir), "--out", str(tmp_path / "m.pt"),
                 "--format", "torchscript", "--int8"]) == 2
    assert "--int8 quantizes ONNX exports" in capsys.readouterr().err


@pytest.mark.parametrize("name", cnnkit.list_models() + ["tv:mobilenet_v3_small"])
def test_every_model_exports_to_onnx_through_torch_export(name, tmp_path):
    """The dynamo exporter takes every registered model (and a torchvision one), and the
    export matches PyTorch to 1e-4 at batch 1 and a larger batch (checked on writing)."""
    # narrow widths where a model takes them: the export's checks do not need wide layers
    narrow = {"fastnet": "8,16,16", "resnet9": "8,16,16,16", "resnet18": "8"}
    run = cnnkit.train(plots=False, data="digits", model=name, epochs=1, batch_size=256,
                       width=narrow.get(name),
                       out=str(tmp_path / "run"), log=lambda s: None).run_dir
    out = export(run, tmp_path / "m.onnx")
    assert out.stat().st_size > 0 and not list(tmp_path.glob("*.data"))

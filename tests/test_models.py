import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.errors import CnnkitError
from cnnkit.models import list_models, register_model


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels,num_classes,size", [(3, 10, (16, 16)), (1, 7, (20, 28))])
def test_every_model_on_tiny_inputs(name, in_channels, num_classes, size):
    torch.manual_seed(0)
    model = cnnkit.create_model(name, num_classes=num_classes, in_channels=in_channels,
                                image_size=size)
    x = torch.randn(4, in_channels, *size)
    logits = model(x)
    assert logits.shape == (4, num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"parameters without a gradient: {missing}"
    feats = model.forward_features(x)
    assert torch.equal(model.eval().forward_head(model.forward_features(x)), model(x))
    assert feats.ndim >= 2


def _layers(model):
    return [m for m in model.modules() if not isinstance(m, nn.Sequential) and m is not model]


def test_seed_cnn_is_the_tutorial_model_exactly():
    model = cnnkit.create_model("seed-cnn")
    assert sum(p.numel() for p in model.parameters()) == 4_210_090
    layers = _layers(model)
    assert [type(m).__name__ for m in layers] == [
        "Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU", "MaxPool2d",
        "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    c1, _, d1, c2, _, pool, _, fc1, _, d2, fc2 = layers
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.padding) == (3, 32, (3, 3), (1, 1))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.padding) == (32, 32, (3, 3), (1, 1))
    assert (d1.p, d2.p, pool.kernel_size) == (0.3, 0.5, 2)
    assert (fc1.in_features, fc1.out_features) == (8192, 512)
    assert (fc2.in_features, fc2.out_features) == (512, 10)


def test_seed_simple_is_the_tutorial_model_exactly():
    model = cnnkit.create_model("seed-simple")
    assert sum(p.numel() for p in model.parameters()) == 268_650
    layers = _layers(model)
    assert [type(m).__name__ for m in layers] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
        "Flatten", "Linear", "ReLU", "Linear"]
    c1, c2 = layers[0], layers[3]
    assert (c1.in_channels, c1.out_channels, c2.in_channels, c2.out_channels) == (3, 16, 16, 32)
    assert (layers[7].in_features, layers[7].out_features) == (2048, 128)
    assert (layers[9].in_features, layers[9].out_features) == (128, 10)


def test_flatten_size_follows_the_input():
    model = cnnkit.create_model("seed-cnn", num_classes=4, in_channels=1, image_size=64)
    assert model.head[1].in_features == 32 * 32 * 32
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4)


def test_registry_refuses_duplicates_and_names_choices():
    with pytest.raises(ValueError, match="already registered"):
        register_model("seed-cnn")(lambda **kw: None)
    with pytest.raises(CnnkitError, match="seed-cnn") as e:
        cnnkit.create_model("no-such-net")
    assert "seed-simple" in str(e.value)

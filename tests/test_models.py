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


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_8x8_digits(name):
    model = cnnkit.create_model(name, num_classes=10, in_channels=1, image_size=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_fastnet_whitening_conv_whitens_patches():
    torch.manual_seed(0)
    # correlated channels and neighbouring pixels: far from white
    base = torch.randn(64, 1, 17, 17)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn_like(base),
                        base.roll(1, 3) + 0.1 * torch.randn_like(base)], 1)
    model = cnnkit.create_model("fastnet", widths=(8, 8, 8), image_size=17)
    model.init_from_data(images, eps=0.0)
    half = model.whiten.weight.shape[0] // 2
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:half])
    flat = out.permute(0, 2, 3, 1).reshape(-1, half)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(half), atol=0.05)
    assert torch.equal(model.whiten.weight[half:], -model.whiten.weight[:half])
    assert not model.whiten.weight.requires_grad


def test_width_flag_reaches_the_model():
    model = cnnkit.create_model("fastnet", widths=(16, 32, 48))
    assert model.fc.in_features == 48
    with pytest.raises(CnnkitError, match="resnet9 takes 4"):
        cnnkit.create_model("resnet9", widths=(16, 32))


def test_model_sizes_are_the_known_architectures():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # CIFAR ResNet-18 has 11.17M parameters; the DAWNBench ResNet-9 6.57M
    assert abs(count(cnnkit.create_model("resnet18")) - 11_173_962) == 0
    assert abs(count(cnnkit.create_model("resnet9")) - 6_573_120) < 10_000


@pytest.mark.parametrize("name", list_models() + ["tv:mobilenet_v3_small",
                                                  "timm:mobilenetv3_small_100"])
def test_every_model_fulfils_the_contract(name):
    """What the training code relies on, for every model (as timm's tests do): the
    classifier can be found and replaced, and the hooks run."""
    from cnnkit.models.base import Classifier
    torch.manual_seed(0)
    model = cnnkit.create_model(name, num_classes=4, in_channels=3, image_size=32)
    assert isinstance(model, Classifier)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 4
    x = torch.randn(2, 3, 32, 32)
    model.init_from_data(x)
    cfg = cnnkit.make_config(model=name, freeze_epochs=1 if name.startswith("tv:") else 0)
    assert model.warmup_epochs(cfg) in (0, cfg.freeze_epochs, cfg.whiten_bias_epochs)
    trained = lambda: [p.requires_grad for p in model.parameters()]  # noqa: E731
    model.on_epoch(0, cfg)
    early = trained()
    model.on_epoch(model.warmup_epochs(cfg), cfg)
    assert (early == trained()) == (model.warmup_epochs(cfg) == 0)  # a warm-up changes them
    body = {id(p) for p in model.backbone_parameters()}
    assert body <= {id(p) for p in model.parameters()} and id(head.weight) not in body
    model.reset_classifier(6)
    assert model.eval()(x).shape == (2, 6) and model.get_classifier().out_features == 6

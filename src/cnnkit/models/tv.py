"""torchvision's classification models by name (`tv:resnet18`, `tv:mobilenet_v3_small`, ...),
their classifier head replaced for the data set's classes, for transfer learning."""
from __future__ import annotations

import contextlib
import io

import torch.nn as nn

from ..errors import DownloadError, SettingsError, unknown_choice
from .base import Classifier

PREFIX = "tv:"
NO_AUX = {"googlenet", "inception_v3"}  # built without auxiliary heads: one output


def tv_names() -> list[str]:
    from torchvision import models
    return [PREFIX + n for n in models.list_models(module=models)]


class TorchvisionNet(Classifier):
    """A torchvision model whose last Linear layer is `head`; the rest is the backbone."""

    def __init__(self, name: str, num_classes: int, in_channels: int):
        super().__init__()
        from torchvision import models
        kwargs = {"aux_logits": False, "init_weights": False} if name in NO_AUX else {}
        self.net = models.get_model(name, weights=None, **kwargs)
        linears = [n for n, m in self.net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise SettingsError(f"tv:{name} has no linear classifier head to replace; "
                                "pick another model")
        self.head_name = linears[-1]
        old = self.net.get_submodule(self.head_name)
        self.net.set_submodule(self.head_name, nn.Identity())
        self.head = nn.Linear(old.in_features, num_classes)
        self._zero_head()
        self.in_channels = in_channels
        self.frozen = False

    def _zero_head(self) -> None:
        # The new head starts at zero (as BiT's fine-tuning does): every class equally
        # likely, and no random projection of the features to unlearn (measured:
        # benchmarks/RESULTS.md, section 6).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        self._zero_head()

    def forward_features(self, x):
        if self.in_channels == 1:  # ImageNet models take RGB: repeat a grey channel
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)

    def forward_head(self, x):
        return self.head(x)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def warmup_epochs(self, cfg) -> int:
        return cfg.freeze_epochs

    def on_epoch(self, epoch: int, cfg) -> None:
        self.set_frozen(epoch < cfg.freeze_epochs)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze the backbone (weights and BatchNorm statistics) or release it."""
        self.frozen = frozen
        for p in self.net.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.net.eval()  # BatchNorm statistics stay as pretrained
        return self

    def load_pretrained(self, state: dict, source: str) -> None:
        """Load an ImageNet state_dict (as torchvision saves it) into the backbone; its
        1000-class head is left out, the new head keeps its fresh initialisation."""
        head_keys = {f"{self.head_name}.weight", f"{self.head_name}.bias"}
        own = self.net.state_dict()
        body = {k: v for k, v in state.items() if k not in head_keys and
                not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
        missing = [k for k in own if k not in body]
        wrong = [k for k in body if k not in own or body[k].shape != own[k].shape]
        if missing or wrong:
            key = (missing or wrong)[0]
            raise SettingsError(f"{source} does not fit this torchvision model "
                                f"({len(missing)} tensors missing, {len(wrong)} unexpected or "
                                f"of another shape, e.g. {key})")
        self.net.load_state_dict(body, strict=True)


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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DownloadError(f"could not download the ImageNet weights of tv:{name} ({reason}); "
                            f"with no network, pass --weights FILE with a local copy") from None


def build(name: str, num_classes: int, in_channels: int) -> TorchvisionNet:
    short = name[len(PREFIX):]
    if name not in tv_names():
        raise unknown_choice("torchvision model", name, tv_names())
    return TorchvisionNet(short, num_classes, in_channels)

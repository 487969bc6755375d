"""The contract every cnnkit model fulfils, so the training code never asks which model it
holds (as timm's models share `forward_features` / `forward_head` / `reset_classifier`).

A model takes (N, in_channels, H, W) floats and returns (N, num_classes) logits. The hooks
below default to "nothing special"; a model overrides the ones that apply to it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import SettingsError

if TYPE_CHECKING:
    from ..config import Config


class Classifier(nn.Module):
    # Dotted name of the final Linear layer (names stay as saved runs know them).
    classifier: str = "head"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional body: images to feature maps (or pooled features)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Features to logits."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.classifier)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final layer for `num_classes` classes (transfer to another data set)."""
        old = self.get_classifier()
        self.set_submodule(self.classifier, nn.Linear(old.in_features, num_classes,
                                                      bias=old.bias is not None))

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from normalized training images (N, C, H, W),
        called once before training (fastnet's whitening conv). Default: nothing."""

    def warmup_epochs(self, cfg: "Config") -> int:
        """How many first epochs train another set of parameters than the rest (0: none),
        as `on_epoch` switches them."""
        return 0

    def on_epoch(self, epoch: int, cfg: "Config") -> None:
        """Called before each training epoch, to switch what trains (a frozen backbone,
        fastnet's whitening bias). Default: everything trains throughout."""

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of a pretrained body, which fine-tuning trains at a lower lr and whose
        BatchNorm biases keep the base lr. Empty for a model trained from scratch."""
        return []

    def load_pretrained(self, state: dict, source: str, head: bool = False) -> None:
        """Load a state_dict of the model's original form (e.g. torchvision's, with its
        1000-class head) into the body, and with `head` its classifier into the head too.
        Models without one refuse."""
        raise SettingsError(f"{source}: this model has no pretrained form; pass a cnnkit "
                            "checkpoint or .safetensors file of the same model")


class PretrainedNet(Classifier):
    """A model of another library (torchvision, timm) as `net`, whose own classifier is
    replaced by `head`, a Linear layer for the data set's classes: the shape transfer
    learning takes. Subclasses build `net` (returning pooled features) and map the family's
    saved state_dicts onto it (`load_pretrained`)."""

    def __init__(self, net: nn.Module, features: int, num_classes: int, in_channels: int):
        super().__init__()
        self.net = net
        self.head = nn.Linear(features, num_classes)
        self._zero_head()
        self.in_channels = in_channels
        self.frozen = False
        self.frozen_bn = False  # BatchNorm statistics kept while the backbone trains

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
        if self.frozen:
            # Nothing of the backbone trains: no graph is kept and no backward runs
            # through it, so a frozen epoch costs a forward pass of it, not three.
            with torch.no_grad():
                return self.net(x)
        return self.net(x)

    def forward_head(self, x):
        return self.head(x)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def warmup_epochs(self, cfg) -> int:
        return cfg.freeze_epochs

    def on_epoch(self, epoch: int, cfg) -> None:
        self.frozen_bn = bool(cfg.freeze_bn)
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
        elif mode and self.frozen_bn:
            # A few hundred photos in small, augmented batches would pull the statistics
            # away from what the pretrained layers after them expect (Keras' transfer
            # learning guide keeps BatchNorm in inference mode for the same reason).
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # The family's name in messages; subclasses split its state_dicts (`split_pretrained`).
    family = ""

    def split_pretrained(self, state: dict) -> tuple[dict, dict]:
        """A state_dict as the family saves it → (the body's tensors, the family's
        classifier as {"weight", "bias"}, empty if it has none)."""
        raise NotImplementedError

    def load_pretrained(self, state: dict, source: str, head: bool = False) -> None:
        """Load the family's state_dict into `net`, or fail naming how it does not fit; with
        `head`, its classifier goes into `head` (predicting the pretrained classes),
        else the head keeps its fresh start."""
        body, classifier = self.split_pretrained(state)
        own = self.net.state_dict()
        missing = [k for k in own if k not in body]
        wrong = [k for k in body if k not in own or body[k].shape != own[k].shape]
        if missing or wrong:
            key = (missing or wrong)[0]
            raise SettingsError(f"{source} does not fit this {self.family} model "
                                f"({len(missing)} tensors missing, {len(wrong)} unexpected or "
                                f"of another shape, e.g. {key})")
        self.net.load_state_dict(body, strict=True)
        if head:
            weight = classifier.get("weight")
            if weight is None or weight.shape != self.head.weight.shape:
                raise SettingsError(f"{source} has no classifier for "
                                    f"{self.head.out_features} classes to predict with")
            self.head.load_state_dict(classifier, strict=True)

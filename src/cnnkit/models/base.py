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
        """How many first epochs train another set of parameters than the rest (0: none);
        `plan_steps` times both phases."""
        return 0

    def on_epoch(self, epoch: int, cfg: "Config") -> None:
        """Called before each training epoch, to switch what trains (a frozen backbone,
        fastnet's whitening bias). Default: everything trains throughout."""

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of a pretrained body, which fine-tuning trains at a lower lr and whose
        BatchNorm biases keep the base lr. Empty for a model trained from scratch."""
        return []

    def load_pretrained(self, state: dict, source: str) -> None:
        """Load a state_dict of the model's original form (e.g. torchvision's, with its
        1000-class head) into the body. Models without one refuse."""
        raise SettingsError(f"{source}: this model has no pretrained form; pass a cnnkit "
                            "checkpoint or .safetensors file of the same model")

"""Models are registered by name and built with `create_model`, as in timm.

Every model takes (N, in_channels, H, W) floats and returns (N, num_classes) logits, and
splits `forward_features` (the convolutional body) from `forward_head` (the classifier).
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import SettingsError, unknown_choice
from . import timm_models, tv


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    description: str
    recipe: str = "fast"  # the recipe a run of this model uses when none is named
    # For a model with pretrained weights: their input size and normalization, and the
    # weights themselves (downloaded); None for models trained from scratch.
    pretrained_info: Callable[[], dict] | None = None
    pretrained_state: Callable[[], dict] | None = None
    pretrained_classes: Callable[[], list[str]] | None = None  # the names of their head's classes
    # --width when none is given, per device type (measured fastest there); else the model's own
    widths: dict[str, str] | None = None

    def default_width(self, device_type: str) -> str | None:
        return (self.widths or {}).get(device_type)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = "", widths: dict[str, str] | None = None):
    """Decorator: register a builder `fn(num_classes, in_channels, image_size, **kw)`;
    `widths` maps a device type to the --width it uses when none is given."""
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, description or (fn.__doc__ or "").strip(),
                                     widths=widths)
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


# Other libraries' model zoos, by prefix: (module, what the family is called)
FAMILIES = {tv.PREFIX: (tv, "torchvision"), timm_models.PREFIX: (timm_models, "timm")}


def is_zoo_name(name: str) -> bool:
    """Whether `name` names a model of another library's zoo (tv:NAME, timm:NAME)."""
    return str(name).startswith(tuple(FAMILIES))


def model_entry(name: str) -> ModelEntry:
    for prefix, (family, title) in FAMILIES.items():
        if name.startswith(prefix):
            if name not in family.names():
                close = difflib.get_close_matches(name, family.names(), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise SettingsError(f"unknown {title} model {name!r}{hint}; list them with: "
                                    f"{family.LISTED_BY}")
            short = name[len(prefix):]
            return ModelEntry(name, lambda num_classes, in_channels, image_size:
                              family.build(name, num_classes, in_channels),
                              f"{title} {short}", recipe="finetune",
                              pretrained_info=lambda: family.pretrained_info(short),
                              pretrained_state=lambda: family.pretrained_state(short),
                              pretrained_classes=lambda: family.pretrained_classes(short))
    if name not in _REGISTRY:
        raise unknown_choice("model", name, list_models() + [
            "tv:NAME, timm:NAME (see cnnkit models)"])
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 image_size: int | tuple[int, int] = 32, **kwargs) -> nn.Module:
    """Build a registered model for images of `in_channels` × `image_size`."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    entry = model_entry(name)
    accepted = inspect.signature(entry.build).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        flags = ", ".join("--width" if k == "widths" else k for k in unknown)
        raise SettingsError(f"{flags} does not apply to {name}")
    return entry.build(num_classes=num_classes, in_channels=in_channels,
                                   image_size=size, **kwargs)

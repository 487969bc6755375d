"""Model size and cost: parameters and FLOPs per image, counted by PyTorch itself."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import create_model


def model_stats(name: str, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 32) -> dict:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels,
                         image_size=image_size).eval()
    x = torch.zeros(1, in_channels, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "flops": counter.get_total_flops()}

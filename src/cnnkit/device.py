"""Where and in what number format to compute: chosen once, at the edge, then passed in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SettingsError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype                  # autocast dtype for the forward pass
    memory_format: torch.memory_format

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


def select_runtime(name: str = "auto", local_rank: int | None = None) -> Runtime:
    """auto: CUDA if present, else the CPU. CUDA computes in bf16 autocast; the CPU in
    float32 (this class of CPU has no native bf16). channels_last is faster for convs on both.
    Under DDP (`local_rank` given) each process on a machine takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None and torch.cuda.is_available():
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError("--device cuda was asked for but no CUDA GPU is available; "
                              "use --device cpu")
        return Runtime(device, torch.bfloat16, torch.channels_last)
    if device.type != "cpu":
        raise SettingsError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return Runtime(device, torch.float32, torch.channels_last)


def synchronize(runtime: Runtime) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)

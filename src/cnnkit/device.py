"""Where and in what number format to compute: chosen once, at the edge, then passed in."""
from __future__ import annotations

import ctypes
import os
import platform
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

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """fp16 gradients underflow unless the loss is scaled up first; bf16's do not."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None


AMP = ("auto", "bf16", "fp16", "off")


def select_runtime(name: str = "auto", local_rank: int | None = None, amp: str = "auto"
                   ) -> Runtime:
    """auto: CUDA if present, else the CPU. channels_last is faster for convs on both.
    `amp` picks the autocast dtype: auto is bf16 on a GPU that has it, fp16 (with a
    GradScaler in training) on one that does not (T4, V100), float32 on the CPU (this class
    of CPU has no native bf16). Under DDP (`local_rank` given) each process on a machine
    takes its own GPU."""
    if amp not in AMP:
        raise SettingsError(f"unknown --amp {amp!r}; use one of {', '.join(AMP)}")
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
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if amp == "bf16" and not bf16:
            raise SettingsError(f"{torch.cuda.get_device_name(device)} has no native bf16; "
                                "use --amp fp16 (or auto)")
        dtype = {"auto": torch.bfloat16 if bf16 else torch.float16, "bf16": torch.bfloat16,
                 "fp16": torch.float16, "off": torch.float32}[amp]
        return Runtime(device, dtype, torch.channels_last)
    if device.type != "cpu":
        raise SettingsError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if amp == "fp16":
        raise SettingsError("--amp fp16 is for CUDA GPUs; on the CPU use --amp bf16 "
                            "(fast only on CPUs with native bf16) or off")
    return Runtime(device, torch.bfloat16 if amp == "bf16" else torch.float32,
                   torch.channels_last)


def synchronize(runtime: Runtime) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Let this process keep the memory it frees (glibc on Linux; elsewhere nothing).

    A training step allocates and frees the same large activation buffers again and again.
    glibc's malloc serves those over its mmap threshold (at most 32 MB) with fresh pages
    from the kernel and hands them back on free, and gives the top of its heap back too, so
    every step page-faults its memory in again: 2-3 million faults in six fast epochs on
    the CPU here. Served from the heap and never trimmed, the buffers are reused as they
    are: training ran 9% faster, for a peak resident size 23% higher (benchmarks/RESULTS.md
    section 23). For a process that cnnkit runs to train, not a library's host: the CLI's
    training commands call it, and so does each process `train(nproc=N)` spawns. An
    allocator the environment already chose (MALLOC_* or GLIBC_TUNABLES variables, an
    LD_PRELOAD) is left as it is. Returns whether the setting was made."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(
            k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")
            for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))

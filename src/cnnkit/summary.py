"""Model size, cost and shapes: parameters and FLOPs per image (PyTorch's flop counter),
and a per-layer table of output shapes (torchinfo) — the tutorial's "what size reaches
the flatten?" for any input size."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import load
from .errors import CnnkitError, unknown_choice
from .models import create_model, list_models


def model_stats(name: str, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 32) -> dict:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels,
                         image_size=image_size).eval()
    x = torch.zeros(1, in_channels, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "flops": counter.get_total_flops()}


def summarize(model: nn.Module, in_channels: int, image_size: tuple[int, int]) -> dict:
    """One row per layer (name, type, output shape, parameters, FLOPs) and totals, for one
    image of in_channels × image_size. A layer the input's shape does not fit is named."""
    import torchinfo

    names = {m: n for n, m in model.named_modules()}
    entered: list[tuple[nn.Module, tuple]] = []

    def note(module, args):  # which layer was running when a shape stopped fitting
        entered.append((module, tuple(a.shape for a in args if torch.is_tensor(a))))
    handle = nn.modules.module.register_module_forward_pre_hook(note)
    try:
        info = torchinfo.summary(model, input_size=(1, in_channels, *image_size), verbose=0,
                                 depth=100, col_names=["output_size", "num_params",
                                                       "mult_adds"], device="cpu")
    except RuntimeError:
        module, shapes = next(((m, s) for m, s in reversed(entered)
                               if not list(m.children())), entered[-1])
        raise CnnkitError(f"at {in_channels}×{image_size[0]}×{image_size[1]} the input to "
                          f"layer {names.get(module, '?')} ({_describe(module)}) has shape "
                          f"{tuple(shapes[0]) if shapes else '?'}, which does not fit it") from None
    finally:
        handle.remove()
    rows = []
    for layer in info.summary_list:
        if not layer.is_leaf_layer or layer.module is model:
            continue
        rows.append({"name": names.get(layer.module, layer.var_name), "type": layer.class_name,
                     "output_shape": list(layer.output_size[1:]),
                     "parameters": sum(p.numel() for p in layer.module.parameters(recurse=False)),
                     "flops": 2 * int(layer.macs),
                     "activation_bytes": int(layer.output_bytes)})
    total = sum(p.numel() for p in model.parameters())
    return {"input": [in_channels, *image_size], "layers": rows,
            "total_parameters": total,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "flops_per_image": sum(r["flops"] for r in rows),
            "activation_bytes_per_image": sum(r["activation_bytes"] for r in rows)}


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Conv2d):
        return f"Conv2d {module.in_channels}→{module.out_channels}, k{module.kernel_size[0]}"
    return type(module).__name__


def summary(model_or_run: str, *, image_size: int | None = None, in_channels: int | None = None,
            num_classes: int | None = None) -> dict:
    """Summarize a registered model (built for the given input) or a trained run (its model as
    trained: feeding it another size shows where the shapes stop fitting)."""
    if model_or_run in list_models():
        size = image_size or 32
        channels = in_channels or 3
        model = create_model(model_or_run, num_classes=num_classes or 10, in_channels=channels,
                             image_size=size)
        name = model_or_run
    elif Path(model_or_run).exists():
        lm = load(model_or_run)
        model, name, channels = lm.model, lm.name, in_channels or lm.in_channels
        size = image_size or lm.image_size[0]
    else:
        raise unknown_choice("model or run", model_or_run, list_models())
    result = summarize(model.eval(), channels, (size, size))
    return {"model": name, **result}


def format_summary(s: dict) -> str:
    rows = [(r["name"], r["type"], "×".join(map(str, r["output_shape"])), f"{r['parameters']:,}",
             f"{r['flops']:,}") for r in s["layers"]]
    head = ("layer", "type", "output shape", "parameters", "FLOPs")
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [f"{s['model']} on one {'×'.join(map(str, s['input']))} image"]
    lines += ["  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in
                        enumerate(zip(line, widths))) for line in [head] + rows]
    lines += [f"total parameters: {s['total_parameters']:,} "
              f"({s['trainable_parameters']:,} trainable)",
              f"FLOPs per image: {s['flops_per_image']:,}",
              f"activation memory per image: {s['activation_bytes_per_image'] / 1024:.1f} KiB"]
    return "\n".join(lines)

"""Look inside a trained network: its learned filters, the feature maps one image makes,
and Grad-CAM heat maps (captum's LayerGradCam) of where the evidence for a class lies."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import LoadedModel, load
from .data import read_image
from .errors import CnnkitError, SettingsError, unknown_choice
from .plots import _save, pyplot
from .transforms import to_input


def _loaded(run) -> LoadedModel:
    return run if isinstance(run, LoadedModel) else load(run, "cpu")


def _layer(model: nn.Module, name: str, kinds=(nn.Module,)) -> nn.Module:
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, kinds)}
    if name not in layers:
        raise SettingsError(f"no layer {name!r}; valid layers: {', '.join(layers)}")
    return layers[name]


def conv_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def cam_layer(lm: LoadedModel, min_side: int = 7) -> str:
    """Grad-CAM's default target: the outermost stage that still has feature maps of at
    least `min_side` pixels (for fastnet at 32×32: blocks.1, 7×7; for a ResNet at 224×224:
    its last stage). Deeper, coarser maps cannot say where in the image the evidence is."""
    order: list[tuple[str, tuple]] = []
    # a stage: an element of a Sequential or ModuleList (not a layer inside a block)
    stages = [f"{parent}.{child}" if parent else child
              for parent, p in lm.model.named_modules()
              if isinstance(p, (nn.Sequential, nn.ModuleList))
              for child, _ in p.named_children()]
    modules = dict(lm.model.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda mod, i, o, n=n: order.append((n, tuple(o.shape)))) for n in stages]
    try:
        with torch.no_grad():
            lm.model.eval()(torch.zeros(1, lm.in_channels, *lm.image_size))
    finally:
        for h in hooks:
            h.remove()
    spatial = [(n, shape) for n, shape in order if len(shape) == 4]
    fitting = [n for n, shape in spatial if min(shape[2:]) >= min_side]
    return fitting[-1] if fitting else spatial[0][0]


# --- filters ---------------------------------------------------------------------------

def _unit(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by its own range (a constant tile becomes mid-grey)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)


def filters(run, out: str | Path, layer: str | None = None, max_tiles: int = 16) -> dict:
    """Draw a conv layer's kernels: the first conv layer's as colour tiles (RGB inputs),
    any other as a grid of output × input channels. Returns what was drawn."""
    plt = pyplot()
    lm = _loaded(run)
    convs = conv_layers(lm.model)
    if not convs:
        raise CnnkitError(f"{lm.name} has no conv layers to draw")
    name = layer or convs[0]
    conv = _layer(lm.model, name, (nn.Conv2d,))
    first_module = next(n for n, m in lm.model.named_modules() if n and not list(m.children()))
    note = "" if layer or first_module == name else \
        f"the first layer is {first_module}, not a conv; drew {name}, the first conv layer"
    w = conv.weight.detach().float().cpu()            # out, in, k, k
    out_c, in_c, kh, kw = w.shape
    if in_c == 3 and name == convs[0]:
        n = out_c
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1 + 0.6),
                                 squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(_unit(w[i]).permute(1, 2, 0).numpy(), interpolation="nearest")
    else:
        rows, cols = min(out_c, max_tiles), min(in_c, max_tiles)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.7 + 1, rows * 0.7 + 0.6),
                                 squeeze=False)
        for i in range(rows):
            for j in range(cols):
                axes[i, j].axis("off")
                axes[i, j].imshow(_unit(w[i, j]).numpy(), cmap="gray", interpolation="nearest")
    fig.suptitle(f"{lm.name} {name}: {out_c}×{in_c}×{kh}×{kw}", fontsize=9)
    fig.tight_layout()
    return {"layer": name, "shape": [out_c, in_c, kh, kw], "file": str(_save(fig, Path(out))),
            "note": note}


# --- feature maps ---------------------------------------------------------------------

def _prepare(lm: LoadedModel, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image as the model sees it, normalized batch of one)."""
    try:
        pixels = read_image(image, lm.image_size, lm.in_channels)
    except FileNotFoundError:
        raise CnnkitError(f"{image}: no such file") from None
    except (OSError, ValueError) as e:
        raise CnnkitError(f"{image}: not a readable image ({str(e).splitlines()[0]})") from None
    return pixels, to_input(pixels[None], lm.mean, lm.std)


def features(run, image, out: str | Path, layers: list[str] | None = None,
             max_channels: int = 16) -> list[dict]:
    """One PNG per layer (default: every conv layer): the input image beside a grid of the
    layer's strongest channels for it. Also writes features.json describing each."""
    plt = pyplot()
    lm = _loaded(run)
    names = layers or conv_layers(lm.model)
    modules = {n: _layer(lm.model, n) for n in names}
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inp, output, n=n: captured.__setitem__(n, output))
             for n, m in modules.items()]
    pixels, x = _prepare(lm, image)
    try:
        with torch.no_grad():
            lm.model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in names:
        fmap = captured[n][0].float()
        if fmap.ndim != 3:
            raise SettingsError(f"layer {n} gives {tuple(fmap.shape)}, not feature maps; "
                                f"pick a conv layer: {', '.join(conv_layers(lm.model))}")
        c, h, w = fmap.shape
        strongest = fmap.mean((1, 2)).argsort(descending=True)[:max_channels]
        cols = math.ceil(math.sqrt(len(strongest)))
        rows = math.ceil(len(strongest) / cols)
        fig = plt.figure(figsize=(3 + cols * 1.2, max(3, rows * 1.2) + 0.5))
        grid = fig.add_gridspec(rows, cols + 3)
        ax = fig.add_subplot(grid[:, :3])
        img = pixels.permute(1, 2, 0).numpy()
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray")
        ax.set_title("input as the model sees it", fontsize=8)
        ax.axis("off")
        for k, ch in enumerate(strongest.tolist()):
            a = fig.add_subplot(grid[k // cols, 3 + k % cols])
            a.imshow(fmap[ch].numpy(), cmap="viridis")
            a.set_title(str(ch), fontsize=6)
            a.axis("off")
        fig.suptitle(f"{n}: {c} channels, {h}×{w} ({len(strongest)} strongest shown)",
                     fontsize=9)
        path = _save(fig, out / f"{n.replace('.', '_')}.png")
        results.append({"layer": n, "channels": c, "height": h, "width": w,
                        "shown": strongest.tolist(), "file": str(path)})
    (out / "features.json").write_text(json.dumps(results, indent=2))
    return results


# --- Grad-CAM ------------------------------------------------------------------------

def gradcam(lm: LoadedModel, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    """Heat map (H, W) in [0, 1] of the evidence for class `target` in a batch of one."""
    from captum.attr import LayerAttribution, LayerGradCam

    module = _layer(lm.model, layer)
    attribution = LayerGradCam(lm.model.eval(), module).attribute(x, target=target)
    heat = LayerAttribution.interpolate(attribution, tuple(x.shape[2:]), "bilinear")
    heat = heat[0, 0].detach().clamp_min(0)
    return heat / heat.max() if heat.max() > 0 else heat


def explain(run, images, out: str | Path, class_name: str | None = None,
            layer: str | None = None) -> list[dict]:
    """Grad-CAM over each image for its top class (or `class_name`), saved as the image
    with the map overlaid, titled with the predicted class and probability."""
    lm = _loaded(run)
    layer = layer or cam_layer(lm)
    _layer(lm.model, layer)
    if class_name is not None and class_name not in lm.classes:
        raise unknown_choice("class", class_name, lm.classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for image in images:
        pixels, x = _prepare(lm, image)
        with torch.no_grad():
            logits = lm.model.eval()(x).float()
            probs = (logits.sigmoid() if lm.multi_label else logits.softmax(1))[0]
        pred = int(probs.argmax())
        target = lm.classes.index(class_name) if class_name else pred
        heat = gradcam(lm, x, target, layer)
        path = out / f"{Path(str(image)).stem}-gradcam.png"
        draw_cam(pixels, heat, f"pred {lm.classes[pred]} {float(probs[pred]):.2f}; "
                 f"evidence for {lm.classes[target]}", path)
        results.append({"file": str(image), "predicted": lm.classes[pred],
                        "probability": float(probs[pred]), "explained": lm.classes[target],
                        "layer": layer, "heatmap": str(path)})
    return results


def draw_cam(pixels: torch.Tensor, heat: torch.Tensor, title: str, out: Path, ax=None):
    plt = pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
    img = pixels.permute(1, 2, 0).numpy()
    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray")
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    if own:
        fig.tight_layout()
        return _save(fig, Path(out))
    return None


def worst_cams(lm: LoadedModel, images: torch.Tensor, items: list[dict], out: Path) -> Path:
    """Grad-CAM for the predicted class of each of the given (worst-classified) images."""
    plt = pyplot()
    n = max(1, len(items))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    layer = cam_layer(lm)
    for ax, item in zip(axes.flat, items):
        pixels = images[item["index"]]
        x = to_input(pixels[None], lm.mean, lm.std)
        heat = gradcam(lm, x, item["pred"], layer)
        draw_cam(pixels, heat, f"true {lm.classes[item['label']]}\npred "
                 f"{lm.classes[item['pred']]} {item['prob']:.2f}", out, ax=ax)
    fig.suptitle(f"Grad-CAM at {layer}: evidence for the wrong prediction", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(out))

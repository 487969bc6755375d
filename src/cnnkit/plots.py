"""Pictures, drawn with matplotlib's file backend (no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def image_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str], out: Path,
               title: str | None = None) -> Path:
    """A square-ish grid of uint8 (N, C, H, W) images titled with their class names."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].permute(1, 2, 0).cpu().numpy()
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray",
                  interpolation="nearest")
        ax.set_title(classes[int(labels[i])], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def show_batch(data: str, out: str | Path, *, n: int = 64, seed: int = 0,
               data_dir: str | None = None, image_size: int | None = None) -> Path:
    """Save a grid of `n` random training images of a data source, like the tutorial's plot."""
    from .data import load_dataset

    ds = load_dataset(data, data_dir=data_dir, image_size=image_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(ds.train), generator=g)[:n]
    return image_grid(ds.train.images[index], ds.train.labels[index], ds.classes, Path(out),
                      title=f"{ds.name}: {len(index)} training images")

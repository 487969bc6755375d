"""`predict`: top classes with softmax probabilities for image files of any size or mode."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import LoadedModel, load
from .data import image_to_tensor, read_image
from .device import select_runtime
from .transforms import to_input


def predict(run, images, *, top_k: int = 3, device: str = "auto") -> list[dict]:
    """For each image (a path or a PIL image): {"file", "predictions": [{"class",
    "probability"}, ...]} best first, or {"file", "error"} when it cannot be read."""
    runtime = select_runtime(device)
    lm = run if isinstance(run, LoadedModel) else load(run, runtime.device)
    lm.model.to(runtime.device)
    results, tensors, slots = [], [], []
    for item in images:
        name = str(item) if not isinstance(item, Image.Image) else "<image>"
        try:
            if isinstance(item, Image.Image):
                x = image_to_tensor(item, lm.image_size, lm.in_channels)
            else:
                if Path(item).is_dir():
                    raise IsADirectoryError("is a directory")
                x = read_image(item, lm.image_size, lm.in_channels)
        except FileNotFoundError:
            results.append({"file": name, "error": "no such file"})
            continue
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            msg = "not a readable image" if isinstance(e, UnidentifiedImageError) else \
                (str(e).splitlines()[0] if str(e) else type(e).__name__)
            results.append({"file": name, "error": msg})
            continue
        slots.append(len(results))
        results.append({"file": name, "predictions": []})
        tensors.append(x)
    if tensors:
        probs = predict_tensor(lm, torch.stack(tensors), runtime.device)
        k = max(1, min(top_k, len(lm.classes)))
        top = probs.topk(k, dim=1)
        for slot, values, idx in zip(slots, top.values.tolist(), top.indices.tolist()):
            results[slot]["predictions"] = [{"class": lm.classes[i], "probability": p}
                                            for p, i in zip(values, idx)]
    return results


@torch.inference_mode()
def predict_tensor(lm: LoadedModel, images: torch.Tensor, device, batch_size: int = 256
                   ) -> torch.Tensor:
    """Softmax probabilities (N, K) for a uint8 batch already at the model's input size."""
    out = []
    for chunk in images.split(batch_size):
        x = chunk if lm.takes_pixels else to_input(chunk.to(device), lm.mean, lm.std)
        out.append(lm.model(x).float().softmax(1).cpu())
    return torch.cat(out)


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            continue  # errors go to stderr, one line each
        preds = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        lines.append(f"{r['file']}: {preds}")
    return "\n".join(lines)

"""Classification metrics from predicted and true labels."""
from __future__ import annotations

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) counts, int64 (K, K)."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class; None for a class with no examples."""
    totals = confusion.sum(1)
    return [None if t == 0 else float(confusion[i, i] / t) for i, t in enumerate(totals)]


def accuracy(confusion: torch.Tensor) -> float:
    total = int(confusion.sum())
    return float(confusion.trace()) / total if total else 0.0


def evaluation_record(confusion: torch.Tensor, loss: float, classes: list[str], data: str,
                      split: str) -> dict:
    """What `cnnkit eval` prints and saves: overall and per-class accuracy, the matrix."""
    return {"data": data, "split": split, "num_images": int(confusion.sum()),
            "accuracy": accuracy(confusion), "loss": loss, "classes": list(classes),
            "per_class_accuracy": dict(zip(classes, per_class_accuracy(confusion))),
            "confusion_matrix": confusion.tolist()}

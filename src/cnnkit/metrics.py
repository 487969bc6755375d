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


def top_k_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The fraction of images whose true class is among the k most probable."""
    if not len(labels):
        return 0.0
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return float((top == labels.view(-1, 1)).any(1).float().mean())


def evaluation_record(confusion: torch.Tensor, loss: float, classes: list[str], data: str,
                      split: str, probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """What `cnnkit eval` prints and saves: overall and per-class accuracy, top-5 accuracy
    (more than 5 classes), per-class precision, recall and F1 with their macro and
    weighted averages (scikit-learn's own functions), and the confusion matrix."""
    from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

    k = len(classes)
    y_true, y_pred = labels.cpu().numpy(), probs.argmax(1).cpu().numpy()
    record = {"data": data, "split": split, "num_images": int(confusion.sum()),
              "accuracy": accuracy(confusion), "loss": loss, "classes": list(classes),
              "per_class_accuracy": dict(zip(classes, per_class_accuracy(confusion)))}
    if k > 5 and len(y_true):
        record["top5_accuracy"] = float(top_k_accuracy_score(
            y_true, probs.cpu().double().numpy(), k=5, labels=list(range(k))))
    per_class = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)),
                                                zero_division=0)
    record["per_class"] = {c: {"precision": float(per_class[0][i]), "recall": float(per_class[1][i]),
                               "f1": float(per_class[2][i]), "support": int(per_class[3][i])}
                           for i, c in enumerate(classes)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)),
                                                     average=average, zero_division=0)
        record[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    record["confusion_matrix"] = confusion.tolist()
    return record

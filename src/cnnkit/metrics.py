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


def evaluation_record(confusion: torch.Tensor | None, loss: float, classes: list[str],
                      data: str, split: str, probs: torch.Tensor, labels: torch.Tensor,
                      thresholds: list[float] | None = None) -> dict:
    """What `cnnkit eval` prints and saves: overall and per-class accuracy, top-5 accuracy
    (more than 5 classes), per-class precision, recall and F1 with their macro and
    weighted averages (scikit-learn's own functions), and the confusion matrix. Multi-label
    labels (N, K) get `multilabel_record` at `thresholds` instead."""
    if labels.ndim == 2:
        return multilabel_record(probs, labels, thresholds or [0.5] * len(classes), loss,
                                 classes, data, split)
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


# --- multi-label ------------------------------------------------------------------------
# Implemented here rather than borrowed from scikit-learn, because training computes them
# every epoch on tensors; tests/test_multilabel.py holds them to scikit-learn's values.

def _ranked(scores: torch.Tensor, targets: torch.Tensor):
    """One label's distinct scores, highest first, with the positives among the images
    scoring at least each (tps) and how many images that is (seen): tied scores enter
    together, as in scikit-learn's curves."""
    s = scores.double()
    order = s.argsort(descending=True, stable=True)
    s, t = s[order], targets.double()[order]
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last image of each run of equal scores
    return s[last], t.cumsum(0)[last], (last.nonzero().squeeze(1) + 1).double()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Average precision of one label, as scikit-learn defines it: the sum over the
    distinct scores, highest first, of (R_n - R_(n-1)) × P_n, the recall and precision of
    calling every image that scores at least the n-th. None when no image has the label."""
    positives = float(targets.sum())
    if positives == 0:
        return None
    _, tps, seen = _ranked(scores, targets)
    recall = tps / positives
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * tps / seen).sum())


def mean_average_precision(probs: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[float, list[float | None]]:
    """(mAP, AP per label): the macro mean over the labels that some image has (0 when
    none has any)."""
    aps = [average_precision(probs[:, k], labels[:, k]) for k in range(labels.shape[1])]
    known = [a for a in aps if a is not None]
    return (sum(known) / len(known) if known else 0.0), aps


def best_thresholds(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per label, the threshold of the highest F1 on these images (the highest such one
    on a tie), 0.5 for a label none of them has. It lies halfway between the lowest score
    called positive and the next lower one, so that a score a rounding error away (an
    export, another batch size) stays on its side."""
    thresholds = []
    for k in range(labels.shape[1]):
        positives = float(labels[:, k].sum())
        if positives == 0:
            thresholds.append(0.5)
            continue
        s, tps, seen = _ranked(probs[:, k], labels[:, k])
        n = int((2 * tps / (seen + positives)).argmax())  # F1 = 2TP / (called + positives)
        below = float(s[n + 1]) if n + 1 < len(s) else 0.0
        thresholds.append((float(s[n]) + below) / 2)
    return thresholds


def over_thresholds(probs: torch.Tensor, thresholds) -> torch.Tensor:
    """(N, K) bool: each label called when its probability reaches its threshold."""
    return probs >= torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)


def label_scores(probs: torch.Tensor, labels: torch.Tensor, thresholds) -> dict:
    """Per label at the thresholds: precision, recall, F1 (0 where undefined, as
    scikit-learn's zero_division=0), support; and the accuracy of every (image, label)
    decision (fastai's accuracy_multi) and of whole label sets (exact match)."""
    called, truth = over_thresholds(probs, thresholds), labels > 0.5
    tp = (called & truth).sum(0).double()
    fp = (called & ~truth).sum(0).double()
    fn = (~called & truth).sum(0).double()

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp_min(1), torch.zeros_like(a))
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "support": truth.sum(0),
            "accuracy": float((called == truth).double().mean()) if truth.numel() else 0.0,
            "exact_match": float((called == truth).all(1).double().mean())
            if len(truth) else 0.0}


def multilabel_record(probs: torch.Tensor, labels: torch.Tensor, thresholds, loss: float,
                      classes: list[str], data: str, split: str) -> dict:
    """What `cnnkit eval` prints and saves for a multi-label model: the accuracy of every
    (image, label) decision at the thresholds, the exact-match ratio, mAP, and per label
    its AP, precision, recall, F1, threshold and support, with their macro averages."""
    probs, labels = probs.cpu(), labels.cpu()
    mean_ap, aps = mean_average_precision(probs, labels)
    s = label_scores(probs, labels, thresholds)
    per_label = {c: {"average_precision": aps[i], "precision": float(s["precision"][i]),
                     "recall": float(s["recall"][i]), "f1": float(s["f1"][i]),
                     "threshold": float(thresholds[i]), "support": int(s["support"][i])}
                 for i, c in enumerate(classes)}
    return {"data": data, "split": split, "num_images": len(labels), "multi_label": True,
            "accuracy": s["accuracy"], "exact_match": s["exact_match"],
            "mean_average_precision": mean_ap, "loss": loss, "classes": list(classes),
            "per_label": per_label,
            "macro_avg": {k: float(s[k].mean()) if len(classes) else 0.0
                          for k in ("precision", "recall", "f1")}}

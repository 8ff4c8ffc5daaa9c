"""Classification metrics from a confusion matrix (pure torch, no Ray).

Every metric is derived from one integer confusion matrix, so workers accumulate locally and the
loop sums the matrices (an all-reduce of one ``int64 [C, C]`` tensor) before computing: the result
is the same as if one process had seen every row.
"""
from __future__ import annotations

from typing import Any

import torch


def _as_confusion(conf: torch.Tensor | list[list[int]]) -> torch.Tensor:
    t = torch.as_tensor(conf, dtype=torch.int64)
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"a confusion matrix is square [C, C]; got shape {list(t.shape)}")
    return t


def metrics_from_confusion(conf: torch.Tensor | list[list[int]]) -> dict[str, Any]:
    """Accuracy and macro precision / recall / F1 from a confusion matrix.

    Args:
        conf: ``int [C, C]``, rows = true class, columns = predicted class.

    Returns:
        ``{"accuracy", "precision", "recall", "f1": float, "confusion": list[list[int]], "rows": int}``.
        Macro averages are over all ``C`` classes; a class with no predictions (precision), no
        support (recall) or both (F1) scores 0 for that term instead of dividing by zero. An empty
        matrix (no rows seen) gives 0.0 everywhere.

    Raises:
        ValueError: ``conf`` is not square.
    """
    c = _as_confusion(conf).to(torch.float64)
    tp = torch.diagonal(c)
    predicted = c.sum(dim=0)  # column sums: how often each class was predicted
    support = c.sum(dim=1)  # row sums: how often each class truly occurs
    total = c.sum()

    # where() on a safe denominator: 0/0 must be 0 here, not NaN plus a warning.
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    pr = precision + recall
    f1 = torch.where(pr > 0, 2 * precision * recall / pr.where(pr > 0, torch.ones_like(pr)), torch.zeros_like(pr))

    n = c.shape[0]
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": float(precision.mean()) if n else 0.0,
        "recall": float(recall.mean()) if n else 0.0,
        "f1": float(f1.mean()) if n else 0.0,
        "confusion": _as_confusion(conf).tolist(),
        "rows": int(total),
    }


class ClassificationMetrics:
    """Accumulates a confusion matrix over batches; mergeable across workers.

    Example:
        >>> m = ClassificationMetrics(3)
        >>> m.update(logits, labels)              # logits [B, C] or predicted ids [B]
        >>> dist.all_reduce(m.confusion)          # in a multi-worker loop (sum)
        >>> m.compute()["accuracy"]

    Attributes:
        num_classes: ``C``.
        confusion: ``int64 [C, C]`` on CPU, rows = true class, columns = predicted class.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits_or_preds: ``[B, C]`` scores (logits or probabilities; argmax is taken) or ``[B]``
                predicted class ids.
            labels: ``[B]`` true class ids in ``[0, C)``.

        Raises:
            ValueError: shapes disagree or a label / prediction is outside ``[0, C)``.
        """
        preds = logits_or_preds.detach()
        if preds.dim() == 2:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} classes, metrics expect {self.num_classes}")
            preds = preds.argmax(dim=1)
        elif preds.dim() != 1:
            raise ValueError(f"expected logits [B, C] or predictions [B], got shape {list(preds.shape)}")
        labels = labels.detach().reshape(-1)
        if preds.shape[0] != labels.shape[0]:
            raise ValueError(f"{preds.shape[0]} predictions but {labels.shape[0]} labels")
        if labels.numel() == 0:
            return
        preds = preds.to("cpu", torch.int64)
        labels = labels.to("cpu", torch.int64)
        for name, t in (("label", labels), ("prediction", preds)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{name} {lo if lo < 0 else hi} is outside [0, {self.num_classes})")
        # One bincount over flattened (true, pred) pairs: no per-row Python loop.
        flat = labels * self.num_classes + preds
        counts = torch.bincount(flat, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def merge_(self, confusion: torch.Tensor | "ClassificationMetrics") -> "ClassificationMetrics":
        """Add another worker's confusion matrix (or accumulator) into this one, in place."""
        other = confusion.confusion if isinstance(confusion, ClassificationMetrics) else confusion
        other = _as_confusion(other.detach().cpu() if isinstance(other, torch.Tensor) else other)
        if other.shape != self.confusion.shape:
            raise ValueError(f"cannot merge a {list(other.shape)} confusion into {list(self.confusion.shape)}")
        self.confusion += other
        return self

    def compute(self) -> dict[str, Any]:
        """See :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self.confusion)

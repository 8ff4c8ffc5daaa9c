"""The one evaluation: a model, batches and the tasks -> loss, accuracy and macro precision/recall/F1 per task,
plus the modality diagnostics and each row's prediction when asked. Plain PyTorch, no Ray.

Every place that measures a model calls :func:`evaluate_model`: the loop's validation each epoch, the export
(val and test of the best epoch), ``mmray evaluate``, the comparison of a compressed export with its source and
the sweep's control arms; so a metric means the same everywhere. Workers of a distributed run pass their
``all_reduce``; everything else runs it on one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from mmray.train.device import batch_to_device
from mmray.train.metrics import ClassificationMetrics, metrics_from_confusion


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision``, or None for full fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def task_losses(logits: dict[str, torch.Tensor], batch: dict[str, Any], label_smoothing: float,
                weights: dict[str, float] | None = None) -> torch.Tensor:
    """Mean cross-entropy over valid rows, weighted-summed over tasks (``train.task_weights``; unlisted
    tasks weigh 1). Invalid (undecodable) rows weigh zero, so every worker still runs forward/backward
    on every batch and DDP stays in step."""
    valid = batch["valid"].float()
    total = logits[next(iter(logits))].new_zeros(())
    for task, task_logits in logits.items():
        per_row = F.cross_entropy(task_logits.float(), batch[task], label_smoothing=label_smoothing, reduction="none")
        weight = (weights or {}).get(task, 1.0)
        total = total + weight * (per_row * valid).sum() / valid.sum().clamp(min=1)
    return total


def modality_ablations(modalities: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``{"without_<m>": (m,), "only_<m>": (every other modality,)}``: what each diagnostic hides.

    Empty for a single modality (there is nothing to remove).
    """
    mods = tuple(sorted(modalities))
    if len(mods) < 2:
        return {}
    out = {f"without_{m}": (m,) for m in mods}
    out |= {f"only_{m}": tuple(o for o in mods if o != m) for m in mods}
    return out


def hide_modalities(batch: dict[str, Any], hidden: Iterable[str]) -> dict[str, Any]:
    """A shallow copy of ``batch`` in which ``hidden`` modalities are missing in every row (``<m>_present`` False)."""
    out = dict(batch)
    for m in hidden:
        key = f"{m}_present"
        like = batch.get(key, batch["valid"])
        out[key] = torch.zeros_like(like, dtype=torch.bool)
    return out


@dataclass
class RowPredictions:
    """The main task's predicted and true class of each valid row, keyed by row id (batches read ``with_ids``)."""

    predicted: dict[str, int] = field(default_factory=dict)
    label: dict[str, int] = field(default_factory=dict)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.inference_mode()
def evaluate_model(model, batches: Iterable[dict[str, Any]], *, tasks: dict[str, int], modalities: Sequence[str],
                   device: str | torch.device = "cpu", precision: str = "fp32", prefix: str = "val",
                   diagnostics: bool = False, channels_last: bool = False,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   rows: RowPredictions | None = None) -> dict[str, Any]:
    """Loss, accuracy and macro precision/recall/F1 per task of ``model`` on ``batches``.

    Args:
        model: the model (a DDP or compiled wrapper is fine); put in eval mode here.
        batches: decoded batches (the reader's, the pipeline's or the embedding cache's format).
        tasks: task -> number of classes (``label`` is the main task).
        modalities: the job's modalities (what the diagnostics mask).
        device, precision: where the batches go and ``train.precision`` (autocast on CUDA).
        prefix: the keys' first part (``val``, ``test``).
        diagnostics: also score the main task with modalities masked as missing (:func:`modality_ablations`).
        channels_last: move images to channels-last memory, as the model was.
        all_reduce: sums a tensor across workers (a distributed run's; identity by default).
        rows: filled with each valid row's prediction (batches must carry ``id``).

    Returns:
        ``{prefix}.{loss|rows|bad_records}``, ``{prefix}.{metric}`` for ``label`` and ``{prefix}.{task}.{metric}``
        for the others (``accuracy``, ``precision``, ``recall``, ``f1``, ``confusion``); with ``diagnostics``
        ``{prefix}.diagnostics.{without_<m>|only_<m>}.{accuracy|f1}``.
    """
    device = torch.device(device)
    reduce = all_reduce or _same
    model.eval()
    amp = autocast_dtype(precision, device)
    acc = {t: ClassificationMetrics(n) for t, n in tasks.items()}
    ablations = modality_ablations(modalities) if diagnostics else {}
    ablated = {name: ClassificationMetrics(tasks["label"]) for name in ablations}
    sums = torch.zeros(3, device=device)  # loss * rows, rows, bad rows
    for batch in batches:
        batch = batch_to_device(batch, device, channels_last=channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(batch).logits
        valid = batch["valid"]
        n_valid = valid.sum()
        sums += torch.stack([task_losses(logits, batch, 0.0) * n_valid, n_valid, (~valid).sum()]).float()
        for t in tasks:
            acc[t].update(logits[t][valid].float().cpu(), batch[t][valid].cpu())
        if rows is not None:
            predicted = logits["label"].argmax(dim=-1).cpu()
            for i, row_id in enumerate(batch["id"]):
                if bool(valid[i]):
                    rows.predicted[row_id] = int(predicted[i])
                    rows.label[row_id] = int(batch["label"][i])
        for name, hidden in ablations.items():
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                masked = model(hide_modalities(batch, hidden)).logits["label"]
            ablated[name].update(masked[valid].float().cpu(), batch["label"][valid].cpu())
    sums = reduce(sums)
    out: dict[str, Any] = {f"{prefix}.loss": (sums[0] / sums[1].clamp(min=1)).item(),
                           f"{prefix}.rows": sums[1].item(), f"{prefix}.bad_records": sums[2].item()}
    for t, m in acc.items():
        scores = metrics_from_confusion(reduce(m.confusion.to(device)).cpu())
        key = prefix if t == "label" else f"{prefix}.{t}"
        for name in ("accuracy", "precision", "recall", "f1"):
            out[f"{key}.{name}"] = float(scores[name])
        out[f"{key}.confusion"] = scores["confusion"]
    for name, m in ablated.items():
        scores = metrics_from_confusion(reduce(m.confusion.to(device)).cpu())
        out[f"{prefix}.diagnostics.{name}.accuracy"] = float(scores["accuracy"])
        out[f"{prefix}.diagnostics.{name}.f1"] = float(scores["f1"])
    return out

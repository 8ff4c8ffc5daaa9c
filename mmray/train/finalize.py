"""After training: evaluate the best checkpoint on val and test, and write the model export. No Ray."""
from __future__ import annotations

import os
from typing import Any

import torch

from mmray import storage as store
from mmray.config import JobConfig
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.reader import iter_batches
from mmray.data.tokenizer import TextTokenizer
from mmray.export import write_export
from mmray.models.builder import build_job_model, job_tasks
from mmray.train.checkpoint import STATE, load_weights
from mmray.train.context import LocalContext
from mmray.train.loop import evaluate

EVAL_BATCH_SIZE = 256


def checkpoint_epoch(checkpoint_dir: str) -> int:
    blob = torch.load(os.path.join(checkpoint_dir, STATE), map_location="cpu", weights_only=False)
    return int(blob["train_state"]["epoch"])


def evaluate_splits(model, config: JobConfig, info: DatasetInfo, tasks: dict[str, int], splits=("val", "test")):
    """``{split}.{metric}`` for each split present in the dataset, with the same code the loop uses."""
    ctx = LocalContext(run_dir="", train_batches=lambda e: (), val_batches=lambda e: ())
    metrics: dict[str, Any] = {}
    for split in splits:
        if split in info.splits and info.split_rows(split) > 0:
            batches = iter_batches(config.data, info, split, batch_size=EVAL_BATCH_SIZE, train=False)
            metrics |= evaluate(model, batches, tasks=tasks, config=config, ctx=ctx, prefix=split)
    return metrics


def export_checkpoint(config: JobConfig, info: DatasetInfo, checkpoint_dir: str, export_dir: str) -> dict[str, Any]:
    """Load ``checkpoint_dir``, measure it on val and test, and write the export folder; returns its metrics.

    Either folder may be a local path or a URI.
    """
    tasks = job_tasks(info.tasks)
    tokenizer = TextTokenizer.load(config.data.text, info) if "text" in config.data.modalities else None
    model = build_job_model(config, tasks, tokenizer, pretrained=False)
    with store.local_copy(checkpoint_dir) as local:
        load_weights(local, model)
        epoch = checkpoint_epoch(local)
    metrics = {"epoch": epoch, **evaluate_splits(model, config, info, tasks)}
    write_export(export_dir, model, config, info, tokenizer, metrics, epoch=epoch)
    return metrics

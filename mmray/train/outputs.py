"""The run folder (``STORAGE/NAME/``, a local path or a URI): the names of what it holds, where a run stands,
and rank 0's per-epoch files. No Ray. Every other module asks this one.

Layout::

    checkpoint_epoch_NNNN/   kept checkpoints (:mod:`mmray.train.checkpoint` names and reads them)
    tensorboard/             per-epoch scalars (and the exported epoch's modality diagnostics)
    metrics.jsonl            one line per epoch: the checkpointed history, rewritten whole each epoch
    export/                  the model export of the best epoch, written when the run finishes

The per-epoch files are written to a local staging folder and synced to the run folder after every epoch,
so a run stored at a URI (``s3://...``) gets them as it goes, not only at the end.
"""
from __future__ import annotations

import json
import os
from typing import Any

from mmray import storage as store
from mmray.storage import StagedDir

TENSORBOARD_DIR = "tensorboard"
EPOCH_METRICS_FILE = "metrics.jsonl"  # not the export's metrics.json
EXPORT_DIR = "export"


def export_dir(run_dir: str) -> str:
    """The run's model export folder."""
    return store.join(run_dir, EXPORT_DIR)


def tensorboard_dir(run_dir: str) -> str:
    """The run's TensorBoard folder."""
    return store.join(run_dir, TENSORBOARD_DIR)


def resolve_run_dir(storage: str, name: str, *, explicit_name: bool) -> tuple[str, str]:
    """``(run_dir, state)`` with state ``new``, ``resume`` (an unfinished run with checkpoints) or
    ``finished`` (only with ``explicit_name``: that run already has its export).

    A finished run is never overwritten: without an explicit name the next free ``NAME-2``,
    ``NAME-3``... is used.
    """
    root = store.normalize(storage)
    candidate, n = name, 1
    while True:
        run_dir = store.join(root, candidate)
        entries = store.listdir(run_dir)
        if EXPORT_DIR not in entries:
            return run_dir, "resume" if any(d.startswith("checkpoint_") for d in entries) else "new"
        if explicit_name:
            return run_dir, "finished"
        n += 1
        candidate = f"{name}-{n}"


class EpochOutputs:
    """Writes one epoch's scalars to TensorBoard and the whole history to ``metrics.jsonl``.

    Args:
        run_dir: the run folder (local path or URI).
        first_epoch: the first epoch this process will write; TensorBoard drops points at or after it
            that an earlier, interrupted attempt wrote (``purge_step``), so a resumed run reads back
            each epoch once.
    """

    def __init__(self, run_dir: str, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self._stage = StagedDir(run_dir)
        self._writer = SummaryWriter(os.path.join(self._stage.local, TENSORBOARD_DIR), purge_step=first_epoch)

    def write(self, epoch: int, scalars: dict[str, float], history: list[dict[str, Any]]) -> None:
        for k, v in scalars.items():
            if k != "epoch":
                self._writer.add_scalar(k.replace(".", "/", 1), v, epoch)
        self._writer.flush()
        # The history comes from the checkpointed train state, so a restarted worker rewrites it whole:
        # one line per epoch, none missing, none twice.
        with open(self._stage.path(EPOCH_METRICS_FILE), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in history)
        self._stage.sync()

    def close(self) -> None:
        self._writer.close()
        self._stage.close()

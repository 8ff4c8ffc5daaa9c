"""Rank 0's per-epoch files in the run folder: TensorBoard scalars and ``metrics.jsonl``. No Ray.

Both are written to a local staging folder and synced to the run folder after every epoch, so a
run stored at a URI (``s3://...``) gets them as it goes, not only at the end.
"""
from __future__ import annotations

import json
import os
from typing import Any

from mmray.storage import StagedDir

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"


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
        with open(self._stage.path(METRICS_FILE), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in history)
        self._stage.sync()

    def close(self) -> None:
        self._writer.close()
        self._stage.close()

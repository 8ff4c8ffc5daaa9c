"""Run the training loop in this process, with no Ray: for tests, quick experiments and in-process trials."""
from __future__ import annotations

from typing import Any, Callable

from mmray.config import JobConfig
from mmray.data.reader import split_readers
from mmray.train.checkpoint import TrainState
from mmray.train.context import LocalContext
from mmray.train.loop import train_loop


def train_local(config: JobConfig, run_dir: str, *, device: str = "cpu",
                on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[TrainState, LocalContext]:
    """Train ``config`` in-process; checkpoints land in ``run_dir/checkpoint_epoch_NNNN``.

    Returns the final train state and the context (its ``history`` and ``checkpoints``).
    """
    ctx = LocalContext(run_dir, *split_readers(config), device=device, on_progress=on_event)
    return train_loop(config, ctx), ctx

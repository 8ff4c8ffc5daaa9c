"""The loop's context inside a Tune trial that trains in-process (one worker, no TorchTrainer start-up)."""
from __future__ import annotations

from typing import Any

from mmray import storage as store
from mmray.config import JobConfig
from mmray.data.reader import split_readers
from mmray.train.context import LocalContext


class TuneTrialContext(LocalContext):
    """Reads Parquet shards directly in the trial process; reports and checkpoints through Ray Tune."""

    cores = None  # a ShareFollower (mmray.tune.cores): the trial's CPU share, followed at each epoch

    def __init__(self, config: JobConfig, run_dir: str, readers=None):
        # readers: (train_batches, val_batches) to use instead of the dataset's shards (the embedding cache)
        super().__init__(run_dir, *(readers or split_readers(config)))

    def train_batches(self, epoch: int):
        if self.cores is not None:
            self.cores.follow()  # more threads once fewer trials remain than cores
        return super().train_batches(epoch)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.history.append(dict(metrics))
        shown = {**metrics, "cpu_share": float(self.cores.threads)} if self.cores is not None else dict(metrics)
        tune.report(shown, checkpoint=checkpoint)

    def latest_checkpoint(self) -> str | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        return checkpoint.to_directory() if checkpoint is not None else None

    def progress(self, event: dict[str, Any]) -> None:
        pass  # Tune's own trial table is the progress display during a sweep


def trial_dir(experiment_dir: str, trial_id: str) -> str:
    return store.join(experiment_dir, "trials", trial_id)

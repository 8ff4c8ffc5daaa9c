"""The loop's context inside a Tune trial that trains in-process (one worker, no TorchTrainer start-up)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from mmray import storage as store
from mmray.config import JobConfig
from mmray.data.reader import split_readers
from mmray.train.checkpoint import copy_checkpoint, is_complete, kept_checkpoints
from mmray.train.context import LocalContext
from mmray.train.trainer import local_checkpoint


class TuneTrialContext(LocalContext):
    """Reads Parquet shards directly in the trial process; reports and checkpoints through Ray Tune."""

    def __init__(self, config: JobConfig, run_dir: str, readers=None, cores=None):
        """``readers``: (train_batches, val_batches) to use instead of the dataset's shards (the embedding or
        decoded-input cache). ``cores``: a :class:`~mmray.tune.cores.ShareFollower`, the trial's CPU share,
        followed at each epoch (None: the threads stay as they are)."""
        super().__init__(run_dir, *(readers or split_readers(config)))
        self.cores = cores

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

    def keep(self, checkpoint_dir: str) -> str:
        """The trial's own copy of its newest checkpoint, in its folder (``trials/<id>/``), written whole before
        the epoch's record: a sweep killed after a trial recorded its last epoch, but before Tune recorded
        that checkpoint, resumes from it and trains nothing again (:meth:`resume_checkpoint`). Older own
        copies are deleted: Tune keeps the trial's checkpoints."""
        name = os.path.basename(checkpoint_dir)
        target = copy_checkpoint(checkpoint_dir, store.join(self.run_dir, name))
        for path in kept_checkpoints(self.run_dir).values():
            if store.split(path)[1] != name:
                store.remove(path)
        return target

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        """The newer of the trial's own copy and the checkpoint Tune recorded (Tune's record may lag)."""
        from ray import tune

        own = {epoch: path for epoch, path in kept_checkpoints(self.run_dir).items() if is_complete(path)}
        if own:
            with store.local_copy(own[max(own)]) as path:  # a URI: a temporary download, deleted after
                yield path
            return
        with local_checkpoint(tune.get_checkpoint()) as path:  # an experiment from before own copies
            yield path

    def progress(self, event: dict[str, Any]) -> None:
        pass  # Tune's own trial table is the progress display during a sweep

"""A sweep killed right after a trial recorded its last epoch: ``--resume`` never trains that trial again.

Tune's own record of a trial's checkpoints lags (it is snapshotted every few seconds); the kill here lands at
the worst point, inside the last epoch's report, after the trial wrote that epoch's metrics. The trial's own
copy of its newest checkpoint, written before the record, is what the restored trial resumes from.
"""
from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray")
import ray.tune  # noqa: E402
from helpers import small_job  # noqa: E402

from mmray.data.synth import synth  # noqa: E402
from mmray.train.checkpoint import read_state  # noqa: E402
from mmray.train.loop import train_loop  # noqa: E402
from mmray.tune.context import TuneTrialContext  # noqa: E402


class Killed(BaseException):
    """The SIGKILL, delivered at an exact point instead of after a delay."""


class FakeTune:
    """What Ray Tune does for an in-process trial: copies each reported checkpoint into its trial folder, and
    on restore hands back the last checkpoint its (lagging) snapshot recorded."""

    def __init__(self, root, kill_at_epoch=None):
        self.root, self.kill_at_epoch = root, kill_at_epoch
        self.recorded: list[str] = []
        self.reports: list[dict] = []

    def report(self, metrics, checkpoint=None):
        import shutil

        if metrics["epoch"] == self.kill_at_epoch:
            raise Killed()
        self.reports.append(metrics)
        if checkpoint is not None:
            dest = os.path.join(self.root, f"checkpoint_{len(self.recorded):06d}")
            shutil.copytree(checkpoint.path, dest)
            self.recorded.append(dest)

    def get_checkpoint(self):
        return ray.tune.Checkpoint.from_directory(self.recorded[0]) if self.recorded else None  # lagging: epoch 1


def test_a_trial_killed_after_recording_its_last_epoch_is_not_trained_again(tmp_path, monkeypatch):
    synth(str(tmp_path / "synth"), rows=80, shards=1, seed=0)
    config = small_job(str(tmp_path / "synth"), workers=1, epochs=2, batch_size=16)
    run_dir = str(tmp_path / "exp" / "trials" / "t1")
    tune = FakeTune(str(tmp_path / "tune"), kill_at_epoch=2)
    monkeypatch.setattr(ray.tune, "report", tune.report)
    monkeypatch.setattr(ray.tune, "get_checkpoint", tune.get_checkpoint)

    with pytest.raises(Killed):
        train_loop(config, TuneTrialContext(config, run_dir))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]  # the last epoch is recorded
    assert [m["epoch"] for m in tune.reports] == [1]  # ... but Tune never heard of it

    tune.kill_at_epoch = None
    ctx = TuneTrialContext(config, run_dir)
    trained = []
    ctx.train_batches = lambda epoch: trained.append(epoch) or []
    state = train_loop(config, ctx)
    assert trained == [] and state.epoch == 2
    assert tune.reports[-1]["epoch"] == 2  # Tune now has the trial's last epoch and its checkpoint
    assert read_state(tune.recorded[-1])["train_state"]["epoch"] == 2
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == ["checkpoint_epoch_0002"]

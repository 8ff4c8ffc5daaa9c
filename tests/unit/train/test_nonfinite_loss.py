"""A training loss that turns NaN stops the run at once, naming the epoch and step; that epoch is never
evaluated, checkpointed or exported."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import small_job

from mmray.data.reader import split_readers
from mmray.data.synth import synth
from mmray.train.context import LocalContext
from mmray.train.loop import NonFiniteLossError, train_loop


def _poisoned(batches, epoch: int, *, at_epoch: int, at_step: int):
    for step, batch in enumerate(batches(epoch), start=1):
        if (epoch, step) == (at_epoch, at_step):
            batch = dict(batch, audio=torch.full_like(batch["audio"], float("nan")))
        yield batch


@pytest.mark.parametrize("at_step", [3, 12])  # between two checks, and just after the first one
def test_a_nan_loss_stops_the_run_naming_epoch_and_step(tmp_path, at_step):
    synth(str(tmp_path / "synth"), rows=200, shards=1, seed=0)
    config = small_job(str(tmp_path / "synth"), workers=1, epochs=3, batch_size=8)
    train, val = split_readers(config)
    reports = []
    ctx = LocalContext(str(tmp_path / "run"), lambda e: _poisoned(train, e, at_epoch=2, at_step=at_step), val,
                       on_report=lambda m, path: reports.append(m["epoch"]))
    with pytest.raises(NonFiniteLossError) as e:
        train_loop(config, ctx)
    message = str(e.value)
    assert f"training loss became nan at epoch 2, step {at_step}" in message
    assert "train.optimizer.lr" in message and "train.precision" in message
    assert reports == [1]  # epoch 2 was neither reported nor checkpointed
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint_epoch_0001", "metrics.jsonl", "tensorboard"]
    assert pickle_roundtrip(e.value).args == e.value.args  # travels from a Ray worker intact


def pickle_roundtrip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


def test_the_error_is_found_inside_ray_trains_wrappers():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from mmray.train.trainer import worker_error

    err = NonFiniteLossError(2, 3, float("nan"), 0.1, "fp16")
    wrapped = pickle_roundtrip(WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(err, "tb"),
                                                                  1: RuntimeError("other")}))
    found = worker_error(wrapped, NonFiniteLossError)
    assert isinstance(found, NonFiniteLossError) and str(found) == str(err)
    assert worker_error(RuntimeError("x"), NonFiniteLossError) is None

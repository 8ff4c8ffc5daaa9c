"""Storage filling up while an epoch's checkpoint is written: one clear error, no partial checkpoint left,
and the same command resumes from the epoch before. The full disk is an injected ENOSPC at the write."""
from __future__ import annotations

import errno
import json
import os

import pytest
from helpers import small_job

from mmray import storage as store
from mmray.data.reader import split_readers
from mmray.data.synth import synth
from mmray.train.checkpoint import StorageFullError
from mmray.train.context import LocalContext
from mmray.train.local import train_local
from mmray.train.loop import train_loop


@pytest.fixture
def config(tmp_path):
    synth(str(tmp_path / "synth"), rows=80, shards=1, seed=0)
    return small_job(str(tmp_path / "synth"), workers=1, epochs=3, batch_size=16)


def _full_on_epoch(monkeypatch, epoch: int):
    real = store.save_weights

    def save_weights(tensors, path, *a, **k):
        if f"checkpoint_epoch_{epoch:04d}" in path:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a partly written file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(store, "save_weights", save_weights)


def test_a_full_disk_at_epoch_2_is_one_message_and_leaves_only_epoch_1(config, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    _full_on_epoch(monkeypatch, 2)
    with pytest.raises(StorageFullError) as e:
        train_local(config, run_dir)
    assert str(e.value).startswith("storage full at ") and "/checkpoint_epoch_0002/model.safetensors" in str(e.value)
    assert "while writing epoch 2's checkpoint" in str(e.value)
    assert "the resume continues from epoch 1's checkpoint" in str(e.value)
    assert sorted(d for d in os.listdir(run_dir) if "checkpoint" in d) == ["checkpoint_epoch_0001"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]  # epoch 2 never recorded

    monkeypatch.undo()  # space freed: the same run continues from epoch 1
    state, ctx = train_local(config, run_dir)
    assert [m["epoch"] for m in ctx.history] == [2, 3] and state.epoch == 3


class _RemoteStore(LocalContext):
    """Where report stores the checkpoint (as Ray Train does) and the disk fills up half-way through."""

    def keep(self, checkpoint_dir):
        return None

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None and metrics["epoch"] == 2:
            partial = os.path.join(self.run_dir, os.path.basename(checkpoint_dir))
            os.makedirs(partial)
            open(os.path.join(partial, "model.safetensors"), "wb").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        if checkpoint_dir is not None:
            LocalContext.keep(self, checkpoint_dir)  # stored here, in report
        super().report(metrics, checkpoint_dir)


def test_a_full_disk_while_the_checkpoint_is_stored_removes_the_partial_folder(config, tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(StorageFullError, match="epoch 2's checkpoint.*continues from epoch 1's checkpoint") as e:
        train_loop(config, _RemoteStore(run_dir, *split_readers(config)))
    assert os.path.join(run_dir, "checkpoint_epoch_0002") in str(e.value)
    assert sorted(d for d in os.listdir(run_dir) if "checkpoint" in d) == ["checkpoint_epoch_0001"]

"""Storing a checkpoint in the background (``checkpoint.async_upload_mb``): which ones go, and what a failed
copy leaves and says. The copy is a plain function here; the Ray Train side is in the worker-death test."""
from __future__ import annotations

import errno
import os

import pytest

from mmray.config.errors import RunError
from mmray.train.checkpoint import (
    CheckpointUploadError,
    StorageFullError,
    copy_checkpoint,
    epoch_of,
    is_complete,
    upload_checkpoint,
    uploads_in_background,
)


def _checkpoint(folder, mb: float = 0.001) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\0" * int(mb * 1e6))
    with open(os.path.join(folder, "state.pt"), "wb") as f:
        f.write(b"state")
    return str(folder)


def test_epoch_of_names_only_checkpoint_folders():
    assert epoch_of("checkpoint_epoch_0003") == 3
    assert epoch_of("/runs/k/checkpoint_epoch_0012/") == 12
    assert epoch_of("s3://b/runs/k/checkpoint_epoch_0001") == 1
    assert epoch_of("checkpoint_2026-11-30") is None and epoch_of("checkpoint_epoch_") is None


def test_only_checkpoints_of_the_threshold_size_go_in_the_background(tmp_path):
    small, big = _checkpoint(tmp_path / "small", 0.5), _checkpoint(tmp_path / "big", 2.0)
    assert not uploads_in_background(small, 1.0) and uploads_in_background(big, 1.0)
    assert uploads_in_background(small, 0) and not uploads_in_background(big, None)


def test_a_stored_upload_deletes_the_local_copy(tmp_path):
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0002")
    target = str(tmp_path / "run" / "checkpoint_epoch_0002")
    assert upload_checkpoint(local, target, lambda: copy_checkpoint(local, target)) == target
    assert is_complete(target) and not os.path.exists(local)


def test_a_passing_error_is_tried_again(tmp_path):
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0002")
    target = str(tmp_path / "run" / "checkpoint_epoch_0002")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            os.makedirs(target)  # a partial copy, as a dropped connection leaves it
            raise OSError("AWS Error SLOW_DOWN during PutObject operation")
        return copy_checkpoint(local, target)

    upload_checkpoint(local, target, flaky, backoff_s=0)
    assert len(calls) == 2 and is_complete(target)


def test_a_failed_upload_is_one_error_naming_the_epoch_and_leaves_nothing(tmp_path):
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0003")
    target = str(tmp_path / "run" / "checkpoint_epoch_0003")

    def broken():
        os.makedirs(target, exist_ok=True)
        open(os.path.join(target, "model.safetensors"), "wb").close()
        raise OSError("AWS Error NETWORK_CONNECTION when uploading part\nsecond line")

    with pytest.raises(CheckpointUploadError) as e:
        upload_checkpoint(local, target, broken, attempts=2, backoff_s=0)
    message = str(e.value)
    assert message.startswith(f"uploading epoch 3's checkpoint to {target} failed in the background: OSError: ")
    assert "AWS Error" not in message and "second line" not in message  # Ray Train must not retry a final error
    assert "continues from the last checkpoint stored, epoch 2's checkpoint or earlier" in message
    assert isinstance(e.value, RunError)  # exit 1, one line, like any failed run
    assert not os.path.exists(target) and not os.path.exists(local)


def test_a_full_disk_during_the_upload_is_the_storage_full_error_at_once(tmp_path):
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0002")
    target = str(tmp_path / "run" / "checkpoint_epoch_0002")
    calls = []

    def full():
        calls.append(1)
        os.makedirs(target, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(target, "model.safetensors"))

    with pytest.raises(StorageFullError, match="epoch 2's checkpoint.*continues from epoch 1's checkpoint"):
        upload_checkpoint(local, target, full, backoff_s=0)
    assert calls == [1]  # a full disk is not tried again
    assert not os.path.exists(target) and not os.path.exists(local)

"""Resuming leaves no copy of the checkpoint in the system temp folder (Ray's ``to_directory`` did, every time)."""
from __future__ import annotations

import os
import tempfile

import pyarrow.fs as pafs
import pytest

ray = pytest.importorskip("ray")
import ray.train  # noqa: E402

from mmray.train.trainer import local_checkpoint  # noqa: E402


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    root = tmp_path / "systemp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _remote_checkpoint():
    fs = pafs._MockFileSystem()
    fs.create_dir("bucket/run/checkpoint_epoch_0001")
    with fs.open_output_stream("bucket/run/checkpoint_epoch_0001/state.pt") as f:
        f.write(b"x" * 1000)
    return ray.train.Checkpoint("bucket/run/checkpoint_epoch_0001", filesystem=fs)


@pytest.mark.parametrize("fail", [False, True])
def test_a_downloaded_checkpoint_is_deleted_after_use_also_on_failure(temp_root, fail):
    with pytest.raises(RuntimeError) if fail else __import__("contextlib").nullcontext():
        with local_checkpoint(_remote_checkpoint()) as path:
            assert os.path.getsize(os.path.join(path, "state.pt")) == 1000
            assert str(temp_root) in path
            if fail:
                raise RuntimeError("resume failed")
    assert os.listdir(temp_root) == []


def test_a_local_checkpoint_is_used_in_place(temp_root, tmp_path):
    folder = tmp_path / "run" / "checkpoint_epoch_0001"
    folder.mkdir(parents=True)
    with local_checkpoint(ray.train.Checkpoint.from_directory(str(folder))) as path:
        assert path == str(folder)
    assert folder.is_dir() and os.listdir(temp_root) == []
    with local_checkpoint(None) as path:
        assert path is None

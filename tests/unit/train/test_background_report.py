"""How a Ray Train worker reports a checkpoint (``RayWorkerContext.report``), with Ray Train's ``report`` and
storage replaced by recorders: a large checkpoint goes in the background (Ray's ASYNC mode) from a folder of its
own, stored by mmray's copy, one at a time; a small one is stored before report returns. No Ray cluster."""
from __future__ import annotations

import os
import threading

import pytest
from helpers import HANG_S

ray_train = pytest.importorskip("ray.train")

from mmray.train import trainer as trainer_module  # noqa: E402
from mmray.train.checkpoint import copy_checkpoint, is_complete  # noqa: E402


class _Storage:
    def __init__(self, run_dir):
        self.run_dir = run_dir

    def persist_current_checkpoint(self, checkpoint, dir_name):
        return copy_checkpoint(checkpoint.path, os.path.join(self.run_dir, dir_name))


class _Config:
    class checkpoint:  # noqa: N801 - stands in for the config section
        async_upload_mb = 1.0


@pytest.fixture
def worker(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    calls = []
    storage = _Storage(run_dir)

    class _Context:
        def get_storage(self):
            return storage

    monkeypatch.setattr(ray_train, "get_context", lambda: _Context())
    monkeypatch.setattr(ray_train, "report", lambda metrics, **kw: calls.append(kw))
    ctx = object.__new__(trainer_module.RayWorkerContext)  # no Ray Train session: only what report uses
    ctx.run_dir, ctx._config, ctx._uploading = run_dir, _Config, None
    return ctx, calls, run_dir


def _checkpoint(folder, mb: float) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\0" * int(mb * 1e6))
    with open(os.path.join(folder, "state.pt"), "wb") as f:
        f.write(b"state")
    return str(folder)


def test_a_small_checkpoint_is_stored_before_report_returns(worker, tmp_path):
    ctx, calls, _ = worker
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0001", 0.1)
    ctx.report({"epoch": 1.0}, local)
    (kw,) = calls
    assert kw.get("checkpoint_upload_mode") is None and kw["checkpoint_dir_name"] == "checkpoint_epoch_0001"
    assert kw["checkpoint"].path == local


def test_a_large_checkpoint_is_uploaded_in_the_background_from_a_folder_of_its_own(worker, tmp_path):
    from ray.train import CheckpointUploadMode

    ctx, calls, run_dir = worker
    local = _checkpoint(tmp_path / "scratch" / "checkpoint_epoch_0001", 2.0)
    ctx.report({"epoch": 1.0}, local)
    (kw,) = calls
    assert kw["checkpoint_upload_mode"] == CheckpointUploadMode.ASYNC and kw["checkpoint_dir_name"] == "checkpoint_epoch_0001"
    own = kw["checkpoint"].path
    assert not os.path.exists(local) and os.path.isdir(own)  # the caller may delete its scratch folder now
    # what Ray Train's upload thread does later: mmray's copy stores it whole and deletes the local one
    stored = kw["checkpoint_upload_fn"](kw["checkpoint"], "checkpoint_epoch_0001")
    assert stored == os.path.join(run_dir, "checkpoint_epoch_0001") and is_complete(stored)
    assert not os.path.exists(own) and not os.path.exists(os.path.dirname(own))


def test_the_next_background_report_waits_for_the_upload_before(worker, tmp_path):
    ctx, calls, run_dir = worker
    ctx.report({"epoch": 1.0}, _checkpoint(tmp_path / "s1" / "checkpoint_epoch_0001", 2.0))
    second = threading.Thread(target=ctx.report,
                              args=({"epoch": 2.0}, _checkpoint(tmp_path / "s2" / "checkpoint_epoch_0002", 2.0)))
    second.start()
    second.join(timeout=1.0)  # not a timing assumption: it must still be waiting, whatever the machine's speed
    assert second.is_alive() and len(calls) == 1
    first = calls[0]
    first["checkpoint_upload_fn"](first["checkpoint"], "checkpoint_epoch_0001")  # the upload ends
    second.join(timeout=HANG_S)
    assert not second.is_alive() and len(calls) == 2
    last = calls[1]
    last["checkpoint_upload_fn"](last["checkpoint"], "checkpoint_epoch_0002")  # and no local copy is left behind
    assert is_complete(os.path.join(run_dir, "checkpoint_epoch_0002")) and not os.path.exists(last["checkpoint"].path)

"""A run on S3 (a real S3 API: moto on loopback) that loses a Train worker to SIGKILL mid-epoch.

One small run (1 worker, 3 epochs, ``train.max_failures: 1``) is shared by the tests: its dataset,
checkpoints, TensorBoard files, metrics and export all live in the bucket, and its only worker is
killed with SIGKILL in the middle of epoch 2. The run must restart the worker from epoch 1's
checkpoint, finish, and read back with every epoch exactly once; the export must load from S3 and
predict exactly what a local copy of it predicts.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from helpers import small_job
from storage_fixtures import s3_bucket  # noqa: F401  (fixture)

from mmray import storage
from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]
EPOCHS = 3
KILL_IN_EPOCH = 2


def train_worker_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://{dashboard}",
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


@pytest.fixture(scope="module")
def run(s3_bucket, tmp_path_factory):
    from mmray.train.api import train

    local_data = str(tmp_path_factory.mktemp("s3") / "synth")
    synth(local_data, rows=800, shards=2, seed=0)  # epochs long enough (several seconds) to kill one mid-way
    data = f"{s3_bucket}/datasets/synth"
    storage.upload(local_data, data)
    events: list[dict] = []
    killed: list[int] = []
    in_kill_epoch, done = threading.Event(), threading.Event()

    def previous_checkpoint_registered() -> bool:
        snapshot = f"{s3_bucket}/runs/s3-run/checkpoint_manager_snapshot.json"
        return storage.exists(snapshot) and f"checkpoint_epoch_{KILL_IN_EPOCH - 1:04d}" in storage.read_text(snapshot)

    def killer() -> None:
        # Ray Train's controller registers the previous epoch's checkpoint a little after the worker reported
        # it (its ~2 s poll); kill as soon as the snapshot names that checkpoint, while the epoch still runs,
        # or the restart would have nothing to resume from.
        in_kill_epoch.wait()
        while not done.is_set() and not any(e["type"] == "epoch_end" and e["epoch"] >= KILL_IN_EPOCH for e in events):
            if previous_checkpoint_registered():
                pids = train_worker_pids(dashboard)
                assert len(pids) == 1, pids
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.1)

    def on_event(event: dict) -> None:
        events.append(event)
        if event["type"] == "epoch_start" and event["epoch"] == KILL_IN_EPOCH:
            in_kill_epoch.set()

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    # Started after the fixture set AWS_ENDPOINT_URL & co: Ray's workers inherit them.
    dashboard = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False).dashboard_url
    try:
        config = small_job(data, name="s3-run", epochs=EPOCHS, workers=1, batch_size=8, max_failures=1)
        result = train(config, storage=f"{s3_bucket}/runs", on_event=on_event)
        survivors = train_worker_pids(dashboard)
    finally:
        done.set()
        in_kill_epoch.set()
        watcher.join(timeout=10)
        ray.shutdown()
    return result, data, local_data, events, killed, survivors


def test_the_run_and_its_export_live_in_the_bucket(run, s3_bucket):
    result = run[0]
    assert result.run_dir == f"{s3_bucket}/runs/s3-run" and result.export_dir == f"{result.run_dir}/export"
    entries = storage.listdir(result.run_dir)
    assert {"export", "tensorboard", "metrics.jsonl", "checkpoint_manager_snapshot.json"} <= set(entries)
    assert f"checkpoint_epoch_{EPOCHS:04d}" in entries
    assert {"model.safetensors", "config.yaml", "labels.json", "metrics.json", "tokenizer"} <= set(
        storage.listdir(result.export_dir))


def test_killed_worker_restarts_from_the_last_checkpoint(run):
    _, _, _, events, killed, survivors = run
    assert killed, f"epoch {KILL_IN_EPOCH} ended before Ray registered the checkpoint before it; nothing was killed"
    assert killed[0] not in survivors
    assert [e["epoch"] for e in events if e["type"] == "resumed"] == [KILL_IN_EPOCH - 1]
    # the killed epoch never finished; the new worker ran it once, then the rest
    assert [e["epoch"] for e in events if e["type"] == "epoch_end"] == list(range(1, EPOCHS + 1))


def test_history_in_the_bucket_has_every_epoch_once(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run[0]
    with storage.local_copy(storage.join(result.run_dir, "tensorboard")) as tb:
        acc = EventAccumulator(tb)
        acc.Reload()
    for tag in ("val/accuracy", "train/loss"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, EPOCHS + 1)), tag
    lines = storage.read_text(storage.join(result.run_dir, "metrics.jsonl")).splitlines()
    history = [json.loads(line) for line in lines]
    assert [int(m["epoch"]) for m in history] == list(range(1, EPOCHS + 1))
    assert [m["val.accuracy"] for m in history] == pytest.approx([e.value for e in acc.Scalars("val/accuracy")],
                                                                 rel=1e-6)


def test_export_loaded_from_s3_predicts_what_a_local_copy_predicts(run, tmp_path):
    import mmray
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches

    result, _, local_data = run[:3]
    local_export = storage.download(result.export_dir, str(tmp_path / "export"))
    remote, local = mmray.load_model(result.export_dir), mmray.load_model(local_export)
    info = read_dataset_info(local_data)
    batch = next(iter_batches(local.config.data, info, "test", batch_size=64, train=False))
    assert torch.equal(remote.predict_batch(batch), local.predict_batch(batch))


def test_evaluate_and_predict_read_the_export_and_dataset_from_s3(run):
    from mmray.export.evaluate import evaluate, predict_dataset

    result, data = run[:2]
    saved = json.loads(storage.read_text(storage.join(result.export_dir, "metrics.json")))
    again = evaluate(result.export_dir, data, split="test")
    assert again["accuracy"] == pytest.approx(saved["test.accuracy"], abs=1e-9)
    assert {"eval-test.json", "confusion-test.png"} <= set(storage.listdir(result.export_dir))
    out = storage.join(result.run_dir, "preds.jsonl")
    n = predict_dataset(result.export_dir, data, "test", out)
    assert n == len(storage.read_text(out).splitlines()) > 0

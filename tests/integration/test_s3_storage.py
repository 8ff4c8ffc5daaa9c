"""A run stored on S3 (a real S3 API: moto on loopback), trained from a dataset on S3, read back from S3.

One small training run (1 worker, 2 epochs) is shared by the tests; the dataset, checkpoints,
TensorBoard files, metrics and the export all live in the bucket.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from mmray import storage
from mmray.data.synth import synth

from helpers import small_job
from storage_fixtures import s3_bucket  # noqa: F401  (fixture)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
EPOCHS = 2


@pytest.fixture(scope="module")
def run(s3_bucket, tmp_path_factory):
    from mmray.train.api import train

    local_data = str(tmp_path_factory.mktemp("s3") / "synth")
    synth(local_data, rows=300, shards=2, seed=0)
    data = f"{s3_bucket}/datasets/synth"
    storage.upload(local_data, data)
    # Started after the fixture set AWS_ENDPOINT_URL & co: Ray's workers inherit them.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        result = train(small_job(data, name="s3-run", epochs=EPOCHS, workers=1, batch_size=32),
                       storage=f"{s3_bucket}/runs")
    finally:
        ray.shutdown()
    return result, data, local_data


def test_the_run_and_its_export_live_in_the_bucket(run, s3_bucket):
    result, _, _ = run
    assert result.run_dir == f"{s3_bucket}/runs/s3-run" and result.export_dir == f"{result.run_dir}/export"
    entries = storage.listdir(result.run_dir)
    assert {"export", "tensorboard", "metrics.jsonl", "checkpoint_manager_snapshot.json"} <= set(entries)
    assert f"checkpoint_epoch_{EPOCHS:04d}" in entries
    assert {"model.safetensors", "config.yaml", "labels.json", "metrics.json", "tokenizer"} <= set(
        storage.listdir(result.export_dir))


def test_tensorboard_and_metrics_history_reach_the_bucket(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = run
    with storage.local_copy(storage.join(result.run_dir, "tensorboard")) as tb:
        acc = EventAccumulator(tb)
        acc.Reload()
    assert [e.step for e in acc.Scalars("val/accuracy")] == list(range(1, EPOCHS + 1))
    history = [json.loads(line) for line in storage.read_text(storage.join(result.run_dir, "metrics.jsonl")).splitlines()]
    assert [int(m["epoch"]) for m in history] == list(range(1, EPOCHS + 1))


def test_export_loaded_from_s3_predicts_what_a_local_copy_predicts(run, tmp_path):
    import mmray
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches

    result, _, local_data = run
    local_export = storage.download(result.export_dir, str(tmp_path / "export"))
    remote, local = mmray.load_model(result.export_dir), mmray.load_model(local_export)
    info = read_dataset_info(local_data)
    batch = next(iter_batches(local.config.data, info, "test", batch_size=64, train=False))
    assert torch.equal(remote.predict_batch(batch), local.predict_batch(batch))


def test_evaluate_and_predict_read_the_export_and_dataset_from_s3(run):
    from mmray.export.evaluate import evaluate, predict_dataset

    result, data, _ = run
    saved = json.loads(storage.read_text(storage.join(result.export_dir, "metrics.json")))
    again = evaluate(result.export_dir, data, split="test")
    assert again["accuracy"] == pytest.approx(saved["test.accuracy"], abs=1e-9)
    assert {"eval-test.json", "confusion-test.png"} <= set(storage.listdir(result.export_dir))
    out = storage.join(result.run_dir, "preds.jsonl")
    n = predict_dataset(result.export_dir, data, "test", out)
    assert n == len(storage.read_text(out).splitlines()) > 0

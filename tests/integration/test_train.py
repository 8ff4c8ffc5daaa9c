"""``mmray train`` end to end on a real local Ray: 2 workers, Ray Data, checkpoints, TensorBoard, export.

One training run (module fixture, ~1.5 min on 2 cores) is shared by the tests that read its results.
"""
from __future__ import annotations

import json
import os

import pytest
from helpers import BEST_SINGLE_MODALITY_CEILING, HANG_S, corrupt_image, small_job

from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 6
MARGIN = 0.15


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "synth")
    info = synth(out, rows=2000, shards=2, seed=0)
    bad_id = corrupt_image(os.path.join(out, info.splits["train"].files[0]), row=3)
    return out, bad_id


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    from mmray.train.api import train

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    events: list[dict] = []
    storage = str(tmp_path_factory.mktemp("runs"))
    try:
        result = train(small_job(dataset[0], epochs=EPOCHS), storage=storage, on_event=events.append)
    finally:
        ray.shutdown()
    return result, events


def epoch_metrics(events):
    return [e["metrics"] for e in events if e["type"] == "epoch_end"]


def test_fusion_beats_the_best_single_modality_by_a_margin(run):
    result, events = run
    assert result.metrics["val.accuracy"] > BEST_SINGLE_MODALITY_CEILING + MARGIN
    assert result.metrics["test.accuracy"] > BEST_SINGLE_MODALITY_CEILING + MARGIN
    losses = [m["train.loss"] for m in epoch_metrics(events)]
    assert len(losses) == EPOCHS and losses[-1] < 0.6 * losses[0]


def test_every_epoch_reports_the_metrics_a_user_reads(run):
    _, events = run
    for m in epoch_metrics(events):
        for key in ("train.loss", "val.loss", "val.accuracy", "val.precision", "val.recall", "val.f1", "lr",
                    "train.samples_per_s", "train.bad_records"):
            assert key in m, key
        assert 0 <= m["val.f1"] <= 1 and m["train.samples_per_s"] > 0


def test_corrupt_record_is_counted_every_epoch_and_training_goes_on(run):
    _, events = run
    assert [m["train.bad_records"] for m in epoch_metrics(events)] == [1.0] * EPOCHS


def test_tensorboard_event_files_hold_the_expected_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = run
    acc = EventAccumulator(os.path.join(result.run_dir, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "val/f1", "lr", "train/samples_per_s"} <= tags
    assert [e.step for e in acc.Scalars("val/accuracy")] == list(range(1, EPOCHS + 1))


def test_export_holds_the_best_epoch_and_reloads_to_the_same_predictions(run, dataset):
    from mmray.export.evaluate import evaluate

    result, events = run
    assert sorted(os.listdir(result.export_dir)) >= ["config.yaml", "labels.json", "metrics.json",
                                                     "model.safetensors", "tokenizer", "versions.json"]
    saved = json.load(open(os.path.join(result.export_dir, "metrics.json")))
    by_epoch = {int(m["epoch"]): m for m in epoch_metrics(events)}
    assert by_epoch[saved["epoch"]]["val.accuracy"] == max(m["val.accuracy"] for m in by_epoch.values())
    again = evaluate(result.export_dir, dataset[0], split="test")
    assert again["accuracy"] == pytest.approx(saved["test.accuracy"], abs=1e-9)
    assert again["confusion"] == saved["test.confusion"]
    assert os.path.isfile(os.path.join(result.export_dir, "confusion-test.png"))


def test_ray_checkpoints_keep_the_best_and_the_latest(run):
    result, events = run
    kept = sorted(d for d in os.listdir(result.run_dir) if d.startswith("checkpoint_epoch_"))
    assert f"checkpoint_epoch_{EPOCHS:04d}" in kept  # the latest
    best = max(m["val.accuracy"] for m in epoch_metrics(events))
    assert any(m["val.accuracy"] == best and f"checkpoint_epoch_{int(m['epoch']):04d}" in kept
               for m in epoch_metrics(events))
    assert len(kept) <= 3


def test_two_ray_workers_share_contrastive_negatives(dataset, tmp_path):
    """A real 2-worker Ray Train run with the contrastive loss: the workers gather each other's projections
    (RayWorkerContext.all_gather) every step and train to the end with a finite, falling contrastive loss."""
    from mmray.train.api import train

    config = small_job(dataset[0], epochs=2, batch_size=32)
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"contrastive": config.train.contrastive.model_copy(update={"weight": 0.5})})})
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    events: list[dict] = []
    try:
        result = train(config, storage=str(tmp_path), on_event=events.append)
    finally:
        ray.shutdown()
    losses = [m["train.contrastive_loss"] for m in epoch_metrics(events)]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses) and losses[1] < losses[0]
    assert result.metrics["test.accuracy"] > 0


def test_a_bad_record_under_fail_is_one_mmray_line_not_worker_tracebacks(dataset, tmp_path):
    """Through Ray Data and Ray Train the BadRecordError reaches the CLI wrapped several times: it prints one
    line naming the record, column and reason, exit 1; the workers' tracebacks only with --verbose."""
    import subprocess
    import sys

    import yaml

    raw = small_job(dataset[0], epochs=1, workers=1).model_dump(mode="json")
    raw["data"]["on_bad_record"] = "fail"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "train", str(job), "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 1, proc.stderr
    mmray_lines = [line for line in proc.stderr.splitlines() if line.startswith("mmray:")]
    assert mmray_lines[0].startswith(f"mmray: bad record {dataset[1]!r}: column 'image': cannot decode image")
    assert mmray_lines[1].startswith("mmray: run again with --verbose for the full traceback")
    assert "Traceback" not in proc.stderr and "BadRecordError" not in proc.stderr
    assert not (tmp_path / "runs" / raw["name"] / "export").exists()

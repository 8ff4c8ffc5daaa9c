"""One evaluation path: every caller that measures a model gets the same numbers for the same model and rows.

The callers: the loop's validation each epoch, the export (finalize), ``mmray evaluate``, the sweep's control
arms (per-row predictions from a checkpoint) and the comparison of a compressed export with its source.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import small_job

from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.export.compare import compare_with_source
from mmray.export.evaluate import evaluate
from mmray.export.loader import load_model, load_trained
from mmray.export.quantize import quantize_export
from mmray.models.builder import job_tasks
from mmray.train.evaluation import RowPredictions, evaluate_model
from mmray.train.finalize import export_checkpoint
from mmray.train.local import train_local
from mmray.tune.control_arms import predict_test


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run of the built-in data, its last checkpoint and its export."""
    tmp = tmp_path_factory.mktemp("evaluation")
    data = str(tmp / "data")
    synth(data, rows=200, shards=1, seed=11)
    config = small_job(data, epochs=1, workers=1, batch_size=32)
    state, ctx = train_local(config, str(tmp / "run"))
    info = read_dataset_info(data)
    checkpoint = ctx.checkpoints[-1]
    metrics = export_checkpoint(config, info, checkpoint, str(tmp / "export"))
    return {"data": data, "config": config, "info": info, "history": state.history, "checkpoint": checkpoint,
            "export": tmp / "export", "metrics": metrics}


def test_evaluate_model_counts_what_a_hand_loop_counts(trained):
    predictor = load_model(trained["export"])
    config, info = trained["config"], trained["info"]

    def batches():
        return iter_batches(config.data, info, "test", batch_size=16, train=False, with_ids=True)

    rows = RowPredictions()
    got = evaluate_model(predictor.model, batches(), tasks=job_tasks(predictor.labels),
                         modalities=config.data.modalities, prefix="test", diagnostics=True, rows=rows)
    correct = total = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for batch in batches():
            valid = batch["valid"].bool()
            logits = predictor.model(batch).logits["label"][valid]
            correct += int((logits.argmax(1) == batch["label"][valid]).sum())
            loss_sum += float(F.cross_entropy(logits, batch["label"][valid], reduction="sum"))
            total += int(valid.sum())
    assert got["test.rows"] == total == info.split_rows("test")
    assert got["test.accuracy"] == pytest.approx(correct / total)
    assert got["test.loss"] == pytest.approx(loss_sum / total, rel=1e-5)
    assert len(rows.predicted) == total
    assert sum(rows.predicted[i] == rows.label[i] for i in rows.predicted) == correct
    assert {"test.diagnostics.without_image.accuracy", "test.diagnostics.only_text.f1"} <= set(got)


def test_training_and_the_export_measure_the_checkpoint_alike(trained):
    last, metrics = trained["history"][-1], trained["metrics"]
    for key in ("val.accuracy", "val.f1", "val.loss"):
        assert metrics[key] == pytest.approx(last[key], rel=1e-5), key


def test_mmray_evaluate_and_the_export_agree(trained):
    result = evaluate(str(trained["export"]), trained["data"], split="test")
    metrics = trained["metrics"]
    assert result["accuracy"] == pytest.approx(metrics["test.accuracy"])
    assert result["f1"] == pytest.approx(metrics["test.f1"])
    assert result["loss"] == pytest.approx(metrics["test.loss"], rel=1e-5)
    assert result["diagnostics"]["without_audio"]["accuracy"] == pytest.approx(
        metrics["test.diagnostics.without_audio.accuracy"])


def test_the_control_arms_predictions_score_the_exports_test_accuracy(trained):
    rows = predict_test(trained["checkpoint"])
    assert len(rows.predicted) == trained["info"].split_rows("test")
    accuracy = sum(rows.predicted[i] == rows.label[i] for i in rows.predicted) / len(rows.predicted)
    assert accuracy == pytest.approx(trained["metrics"]["test.accuracy"])


def test_a_checkpoint_and_its_export_load_as_the_same_predictor(trained):
    from_checkpoint, from_export = load_trained(trained["checkpoint"]), load_trained(trained["export"])
    assert from_checkpoint.labels == from_export.labels
    assert from_checkpoint.config.model == from_export.config.model
    a, b = from_checkpoint.model.state_dict(), from_export.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_compressed_comparison_measures_the_original_as_the_export_did(trained, tmp_path):
    out = tmp_path / "export-bf16"
    quantize_export(trained["export"], "bf16", out=out)
    result = compare_with_source(out, trained["data"], split="test", write=False)
    assert result["original"]["measured"] and result["original"]["rows"] == trained["info"].split_rows("test")
    assert result["original"]["accuracy"] == pytest.approx(trained["metrics"]["test.accuracy"])
    assert result["original"]["f1"] == pytest.approx(trained["metrics"]["test.f1"])
    assert 0.0 <= result["agreement"] <= 1.0 and result["compressed"]["rows"] == result["original"]["rows"]

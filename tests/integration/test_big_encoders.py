"""The big-encoder combination end to end on one local Ray cluster: an ``hf_image`` ViT + ``hf_text`` BERT +
``hf_audio`` wav2vec2, LoRA adapters on all three (activation checkpointing on the ViT and the wav2vec2),
``scaling.strategy: fsdp`` on 2 Ray Train workers (gloo).

One run trains, loses a worker after epoch 1 and resumes from its sharded adapters-only checkpoint; a 2-trial
sweep over ``lora.rank`` runs one TorchTrainer per trial; the export holds merged weights and predicts what the
adapted model predicts, with ``peft`` unavailable."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml
from helpers import (
    HANG_S,
    save_tiny_bert,
    save_tiny_vision,
    save_tiny_wav2vec2,
    train_workers,
    wait_for_registered_checkpoint,
)

from mmray.config import validate_job
from mmray.data.synth import Media, synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

RANKS = (2, 4)


def big_job(root) -> dict:
    lora = {"rank": RANKS[0], "alpha": 4}
    return {
        "name": "big", "data": {"path": str(root / "synth"), "audio": {"seconds": 0.5}},
        "model": {"encoders": {
            "image": {"name": "hf_image", "path": str(root / "vit"), "lora": lora, "gradient_checkpointing": True},
            "text": {"name": "hf_text", "path": str(root / "bert"), "lora": lora},
            "audio": {"name": "hf_audio", "path": str(root / "wav2vec2"), "lora": lora,
                      "gradient_checkpointing": True},
        }, "fusion": {"name": "concat", "hidden_dim": 32}},
        # 2 steps per worker and epoch
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"lr": 5e-3}, "early_stopping": {"patience": None},
                  "max_failures": 1},
        "scaling": {"num_workers": 2, "strategy": "fsdp", "cpus_per_worker": 0.5},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The dataset and the three model folders, shared by every test here."""
    root = tmp_path_factory.mktemp("big")
    synth(str(root / "synth"), rows=120, shards=2, seed=0, media=Media(image_size=16, audio_seconds=0.5, sample_rate=8000))
    save_tiny_vision(root / "vit", "vit", 16)
    save_tiny_bert(root / "bert")
    save_tiny_wav2vec2(root / "wav2vec2")
    return root


@pytest.fixture(scope="module")
def run(root, local_ray):
    """The fsdp run; a worker is killed once Ray has registered epoch 1's checkpoint, so the worker group
    restarts from it (``train.max_failures: 1``)."""
    from mmray.train.api import train

    events: list[dict] = []
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(train, validate_job(big_job(root)), storage=str(root / "runs"), on_event=events.append)

        def ended() -> str | None:
            if not running.done():
                return None
            running.result()  # its error, if it failed
            return "the run finished before epoch 1's checkpoint was seen"

        # the event: Ray has registered epoch 1's checkpoint (every rank's shards of it)
        wait_for_registered_checkpoint(root / "runs" / "big", 1, ended)
        workers = train_workers(os.getpid())
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        result = running.result(timeout=HANG_S)
    return result, events


def test_lora_on_three_hf_encoders_trains_sharded_and_resumes_past_the_stored_epoch(run):
    from safetensors.torch import load_file

    from mmray.train.checkpoint import kept_checkpoints, lora_bases

    result, events = run
    shares = [e["line"] for e in events if e["type"] == "sharding"]
    assert shares and all(line.startswith("fsdp: rank 0 holds ") for line in shares), shares
    assert any(e["type"] == "worker_failed" and "restarting from epoch 1's checkpoint" in e["line"] for e in events)
    assert [e["epoch"] for e in events if e["type"] == "resumed"] == [1]
    history = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert [int(m["epoch"]) for m in history] == [1, 2]
    # each checkpoint: the adapters (and what else trains) in shards, the three bases named by hash
    latest = kept_checkpoints(result.run_dir)[2]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "frozen.json"} <= set(os.listdir(latest))
    assert lora_bases(latest).keys() == {"encoders.image", "encoders.text", "encoders.audio"}
    # the export: one whole model.safetensors, adapters merged into the weights they adapt
    exported = load_file(os.path.join(result.export_dir, "model.safetensors"))
    assert not any("lora_" in k for k in exported)
    assert {"encoders.image.model.layers.0.attention.q_proj.weight",
            "encoders.text.model.encoder.layer.0.attention.self.query.weight",
            "encoders.audio.model.encoder.layers.0.attention.q_proj.weight"} <= exported.keys()


def test_the_export_predicts_as_the_adapted_model_without_peft(run, root, monkeypatch):
    import pyarrow.parquet as pq

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches
    from mmray.data.tokenizer import TextTokenizer
    from mmray.export import load_model
    from mmray.models.builder import job_tasks
    from mmray.train.checkpoint import kept_checkpoints, read_config
    from mmray.train.checkpoint import load_model as load_checkpoint

    result, _ = run
    best = kept_checkpoints(result.run_dir)[json.load(open(os.path.join(result.export_dir, "metrics.json")))["epoch"]]
    config = read_config(best)
    info = read_dataset_info(config.data.path)
    adapted = load_checkpoint(config, job_tasks(info.tasks), TextTokenizer.for_job(config.data, info), best).eval()
    batch = next(iter(iter_batches(config.data, info, "val", batch_size=8, train=False)))
    with torch.no_grad():
        expected = torch.softmax(adapted(batch).logits["label"], -1)

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    predictor = load_model(result.export_dir)
    torch.testing.assert_close(predictor.predict_batch(batch), expected, rtol=1e-4, atol=1e-5)
    rows = pq.read_table(os.path.join(config.data.path, info.splits["test"].files[0])).slice(0, 2).to_pylist()
    out = predictor.predict(images=[r["image"] for r in rows], texts=[r["text"] for r in rows],
                            audios=[r["audio"] for r in rows])
    assert len(out) == 2 and all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in out)


def test_a_two_trial_sweep_over_lora_rank_runs_a_sharded_trainer_per_trial(root, local_ray, tmp_path):
    from mmray.tune.api import tune_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(big_job(root) | {"name": "rank"}))
    space = tmp_path / "space.yaml"
    # the random searcher's draws follow its seed: seed 0 draws rank 4, then rank 2
    space.write_text(yaml.safe_dump({
        "metric": "val.loss", "num_samples": 2, "search": {"name": "random", "seed": 0},
        "scheduler": {"name": "none"},
        "parameters": {"model.encoders.image.lora.rank": {"choice": list(RANKS)}, "train.epochs": 1},
    }))
    summary = tune_job(job, space, storage=str(tmp_path / "runs"), finalists=0, ensemble=0, report=False)
    assert [t.status for t in summary.trials] == ["completed", "completed"], summary.trials
    assert sorted(t.params["model.encoders.image.lora.rank"] for t in summary.trials) == list(RANKS)
    with open(os.path.join(summary.experiment_dir, "leaderboard.csv")) as f:
        board = list(csv.DictReader(f))
    assert sorted(int(row["model.encoders.image.lora.rank"]) for row in board) == list(RANKS)
    assert summary.best_dir and os.path.isfile(os.path.join(summary.best_dir, "model.safetensors"))

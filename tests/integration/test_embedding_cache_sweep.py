"""A frozen-encoder sweep on a real local Ray: the embedding cache is built once, before the trials, by Ray
Data; every trial trains from it; a second sweep on the same data reuses it; the best export predicts raw inputs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import HANG_S, SMALL_MODEL

import mmray
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.inspect import inspect_dataset
from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-sweep")
    data = str(root / "synth")
    synth(data, rows=160, shards=2, seed=6)
    model = yaml.safe_load(yaml.safe_dump(SMALL_MODEL))
    for enc in model["encoders"].values():
        enc["freeze"] = True
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "cached", "data": {"path": data, "image": {"augment": False}}, "model": model,
        "train": {"epochs": 1, "batch_size": 32, "early_stopping": {"patience": None}},
        "scaling": {"num_workers": 1},
    }))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 2, "search": {"name": "random", "seed": 0},
        "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]},
                       "model.fusion.name": {"choice": ["concat", "cross_attention"]}},
    }))
    return str(job), str(space), root, data


def tune(job: str, space: str, root, name: str, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "tune", job, "--space", space,
                           "--storage", str(root / "runs"), "--name", name, *extra],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def builds(data: str) -> list[dict]:
    with open(os.path.join(data, ".cache", "embeddings", "builds.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_sweep_builds_the_cache_once_and_the_next_sweep_reuses_it(files):
    job, space, root, data = files
    first = tune(job, space, root, "first")
    assert "embedding cache: used (built in" in first  # the sweep's own line, before any trial
    assert sorted(b["modality"] for b in builds(data)) == ["audio", "image", "text"]  # once, not per trial
    # said once for the sweep: trials that read what the sweep built say nothing about it
    assert "embedding cache: used (reused" not in first and "embedding cache: not used" not in first
    assert "decoded-input cache: not used: the embedding cache serves every epoch" in first  # nothing to decode
    with open(root / "runs" / "first" / "leaderboard.csv") as f:
        assert {row["status"] for row in csv.DictReader(f)} == {"completed"}
    # the space can pick cross_attention, so per-token outputs were stored too
    entry = next(e for e in os.listdir(os.path.join(data, ".cache", "embeddings")) if e.startswith("text-"))
    part = os.path.join(data, ".cache", "embeddings", entry, "val")
    assert "text.sequence" in pq.read_schema(os.path.join(part, sorted(os.listdir(part))[0])).names

    second = tune(job, space, root, "second", "--num-samples", "1")
    assert "embedding cache: used (reused" in second
    assert len(builds(data)) == 3  # nothing rebuilt

    # the export is the whole model: it predicts from raw inputs with no Ray and no cache
    info = read_dataset_info(data)
    rows = pq.read_table(info.split_files("test")[0]).slice(0, 4).to_pylist()
    model = mmray.load_model(str(root / "runs" / "first" / "best"))
    preds = model.predict(images=[r["image"] for r in rows], texts=[r["text"] for r in rows],
                          audios=[r["audio"] for r in rows])
    assert len(preds) == 4 and all(0 <= p["label"] < len(info.class_names) for p in preds)

    listing = inspect_dataset(data)
    assert "embedding caches (3," in listing and "+sequences" in listing


def test_two_workers_train_from_the_cache_until_an_encoder_unfreezes(files):
    """`mmray train` on Ray Train with 2 workers (DDP): audio unfreezes after epoch 1, so epoch 1 reads the
    cache (the audio encoder does not run, yet DDP gets its zero gradients) and epochs 2-3 decode the dataset
    and train the audio encoder; the export is the whole model."""
    from safetensors.torch import load_file

    job, _, root, data = files
    raw = yaml.safe_load(open(job))
    raw["model"]["encoders"]["audio"]["unfreeze_after_epochs"] = 1
    raw["train"]["epochs"], raw["scaling"]["num_workers"] = 3, 2
    partial = root / "partial.yaml"
    partial.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "train", str(partial), "--storage",
                           str(root / "runs"), "--name", "partial"], capture_output=True, text=True, timeout=HANG_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "embedding cache: used (" in out and "epochs 1-1, then the encoders unfreeze" in out
    assert "decoded-input cache: used (" in out  # epochs 2-3 read decoded inputs instead of decoding
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("mmray epoch=")] == [
        "epoch=1/3", "epoch=2/3", "epoch=3/3"]
    from mmray.config import validate_job
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_as_trained, job_tasks

    run = root / "runs" / "partial"
    last = load_file(str(run / "checkpoint_epoch_0003" / "model.safetensors"))  # the latest is always kept
    config, info = validate_job(raw), read_dataset_info(data)
    initial = build_as_trained(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)).state_dict()
    audio = [k for k in last if k.startswith("encoders.audio.") and k.endswith("weight")]
    assert audio and any(not (initial[k] == last[k]).all() for k in audio)  # trained after unfreezing
    assert not any(k.startswith("encoders.image.") for k in last)  # never unfreezes: left out of checkpoints
    assert os.path.isfile(run / "export" / "model.safetensors")

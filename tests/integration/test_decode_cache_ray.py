"""The decoded-input cache on a real local Ray: built once by Ray Data, the workers' Ray Data pipeline over it gives
the rows decoding gives, and a 2-worker ``mmray train`` reads it with the same rows, bad records and metrics."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import HANG_S, SMALL_MODEL, corrupt_image, small_job

from mmray.data import decoded
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import ROW_KEY
from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("decoded-ray") / "synth")
    info = synth(out, rows=400, shards=2, seed=1)
    corrupt_image(os.path.join(out, info.splits["train"].files[0]), row=5)
    return out


def with_cache(config, setting: str, augment: bool | None = None):
    update = {"decode_cache": setting}
    if augment is not None:
        update["image"] = config.data.image.model_copy(update={"augment": augment})
    return config.model_copy(update={"data": config.data.model_copy(update=update)})


def rows(ds) -> list[str]:
    """Every row of a Ray dataset as a digest of its arrays: the multiset of rows, whatever order Ray gives."""
    out = []
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        n = len(batch["valid"])
        for i in range(n):
            h = hashlib.sha256()
            for k in sorted(batch):
                if k == ROW_KEY:  # the shards pipeline's per-row account key, not decoded content (no cache batch has it)
                    continue
                h.update(k.encode() + np.ascontiguousarray(batch[k][i]).tobytes())
            out.append(h.hexdigest())
    return sorted(out)


def test_the_workers_pipeline_over_the_cache_gives_the_rows_decoding_gives(local_ray, data):
    from mmray.data.decoded import build_decoded_dataset
    from mmray.data.pipeline import build_dataset

    config = with_cache(small_job(data), "on", augment=False)
    info = read_dataset_info(data)
    plan = decoded.plan(config, info, build=True)  # Ray Data actors decode the row groups
    assert plan.used and plan.entry.manifest["splits"]["train"]["bad_records"] == 1, plan.line()
    for split, train in (("train", True), ("val", False)):
        raw = rows(build_dataset(config.data, info, split, train=train, seed=0))
        cached = rows(build_decoded_dataset(config.data, info, plan.entry, split, train=train, seed=0))
        assert len(cached) == info.split_rows(split) and cached == raw, split


def test_a_two_worker_run_reads_the_cache_with_the_same_rows_and_metrics(local_ray, data, tmp_path):
    from mmray.train.api import train
    from mmray.train.checkpoint import kept_checkpoints
    from mmray.train.finalize import measure_checkpoint

    config = small_job(data, epochs=2, workers=2)
    runs = {}
    for setting in ("off", "on"):
        events: list[dict] = []
        result = train(with_cache(config, setting), storage=str(tmp_path / setting), on_event=events.append)
        lines = [e["line"] for e in events if e["type"] == "decode_cache"]
        runs[setting] = result, [e["metrics"] for e in events if e["type"] == "epoch_end"], lines
    assert runs["off"][2] == ["decoded-input cache: not used: data.decode_cache is off"]
    assert len(runs["on"][2]) == 1 and runs["on"][2][0].startswith("decoded-input cache: used ("), runs["on"][2]
    for off, on in zip(runs["off"][1], runs["on"][1], strict=True):
        for k in ("train.rows", "train.bad_records", "val.rows", "val.bad_records"):
            assert on[k] == off[k], k
        assert on["train.bad_records"] == 1
    # the export's metrics were measured from the cache: the same as measuring that checkpoint by decoding
    result = runs["on"][0]
    best = kept_checkpoints(result.run_dir)[int(result.metrics["epoch"])]
    info = read_dataset_info(data)
    decoding = measure_checkpoint(with_cache(config, "off"), info, best)[2]
    for key in ("val.accuracy", "val.loss", "test.accuracy", "test.f1"):
        assert result.metrics[key] == pytest.approx(decoding[key], abs=1e-6), key


def test_a_sweep_builds_the_cache_before_its_trials_and_the_next_sweep_reuses_it(tmp_path):
    data = str(tmp_path / "synth")
    synth(data, rows=160, shards=2, seed=2)
    job, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    job.write_text(yaml.safe_dump({"name": "swept", "data": {"path": data}, "model": SMALL_MODEL,
                                   "train": {"epochs": 2, "batch_size": 32, "early_stopping": {"patience": None}},
                                   "scaling": {"num_workers": 1}}))
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 2, "search": {"name": "random", "seed": 0},
        "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]},
                       "data.image.augment": {"choice": [True, False]}},  # applied after the cache: still shared
    }))

    def tune(name: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "tune", str(job), "--space", str(space),
                               "--storage", str(tmp_path / "runs"), "--name", name],
                              capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = tune("first")
    assert "mmray sweep decoded-input cache: used (built in" in first  # the sweep's own line, before any trial
    # said once for the sweep: trials that read what the sweep built say nothing about it
    assert "decoded-input cache: used (reused" not in first and "decoded-input cache: not used" not in first
    second = tune("second")
    assert "mmray sweep decoded-input cache: used (reused" in second
    with open(os.path.join(data, decoded.CACHE_DIR, "builds.jsonl")) as f:
        assert len(f.readlines()) == 1  # one build for both sweeps and all four trials

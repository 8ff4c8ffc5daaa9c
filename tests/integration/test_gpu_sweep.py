"""Small trials sharing one GPU (``scaling.gpus_per_worker: 0.25``): they run at the same time, on CUDA, and
report the GPU's figures. Needs CUDA (marked ``gpu``); skipped without it."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml
from helpers import small_job

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.gpu]


def test_quarter_gpu_trials_share_one_gpu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = str(tmp_path / "synth")
    synth(data, rows=400, shards=2, seed=4)
    config = small_job(data, name="gpu-sweep", epochs=3, workers=1, batch_size=32).model_dump(mode="json")
    config["scaling"] |= {"use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.5}
    job, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    job.write_text(yaml.safe_dump(config))
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 4, "search": {"name": "random", "seed": 0},
        "scheduler": {"name": "none"}, "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]}}}))
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "tune", str(job), "--space", str(space),
                           "--storage", str(tmp_path / "runs"), "--name", "exp"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = str(tmp_path / "runs" / "exp")
    with open(os.path.join(exp, "leaderboard.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(int(r["epochs_run"]) == 3 for r in rows)

    spans = []
    for row in rows:
        events = EventAccumulator(os.path.join(exp, "trials", row["trial_id"], "tensorboard")).Reload()
        assert "gpu/memory_peak_gb" in events.Tags()["scalars"]
        assert all(e.value > 0 for e in events.Scalars("gpu/memory_peak_gb"))
        times = [e.wall_time for e in events.Scalars("val/accuracy")]
        spans.append((min(times), max(times)))
    # At some moment at least two trials were between their first and last epoch: they shared the GPU.
    overlapping = max(sum(1 for a, b in spans if a <= t <= b) for t, _ in spans)
    assert overlapping >= 2, spans

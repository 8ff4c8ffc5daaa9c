"""A training run killed mid-way (SIGKILL of the whole process group) resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job, wait_for_registered_checkpoint

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]
EPOCHS = 5


def mmray_train(job: str, storage: str) -> list[str]:
    return [sys.executable, "-m", "mmray.cli.main", "train", job, "--storage", storage, "--name", "resume-me"]


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    data = str(tmp_path / "synth")
    synth(data, rows=400, shards=2, seed=1)
    job = tmp_path / "job.yaml"
    config = small_job(data, name="resume-me", epochs=EPOCHS, workers=1, batch_size=32)
    job.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    storage = str(tmp_path / "runs")
    run_dir = os.path.join(storage, "resume-me")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # First attempt: killed (with every Ray process it started) once epoch 2's checkpoint is stored.
    first = subprocess.Popen(mmray_train(str(job), storage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, start_new_session=True)
    # the event: Ray has recorded epoch 2's checkpoint in its snapshot (the folder alone is not yet registered)
    wait_for_registered_checkpoint(run_dir, 2, lambda: first.stdout.read() if first.poll() is not None else None)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not os.path.isdir(os.path.join(run_dir, "export"))

    # Second attempt, same command: continues after the last stored epoch, finishes and exports.
    second = subprocess.run(mmray_train(str(job), storage), capture_output=True, text=True, env=env, timeout=HANG_S)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = re.search(r"resuming after epoch (\d+)", second.stdout)
    assert resumed, second.stdout
    resumed_epoch = int(resumed.group(1))
    assert resumed_epoch >= 2
    epochs_run = [int(n) for n in re.findall(r"^mmray epoch=(\d+)/", second.stdout, re.M)]
    assert epochs_run == list(range(resumed_epoch + 1, EPOCHS + 1))
    assert "(resumed)" in second.stdout
    assert os.path.isfile(os.path.join(run_dir, "export", "model.safetensors"))

    # TensorBoard shows each epoch once, across both attempts.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("val/accuracy")) == list(range(1, EPOCHS + 1))
    history = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [int(m["epoch"]) for m in history] == list(range(1, EPOCHS + 1))

    # Third time: the run is finished. Nothing trains (no Ray start-up); the message points to the export.
    third = subprocess.run(mmray_train(str(job), storage), capture_output=True, text=True, env=env, timeout=HANG_S)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"run {run_dir} already finished; nothing was trained. Its export is {run_dir}/export" in third.stdout
    assert "mmray epoch=" not in third.stdout

"""A Train worker killed with SIGKILL mid-epoch: with ``train.max_failures`` the run restarts its worker
from the last checkpoint, finishes, and its per-epoch history has every epoch exactly once."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from mmray.data.synth import synth

from helpers import small_job

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
EPOCHS = 3
KILL_IN_EPOCH = 2


def train_worker_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://{dashboard}", filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmray.train.api import train

    data = str(tmp_path / "synth")
    synth(data, rows=400, shards=2, seed=0)
    events: list[dict] = []
    killed: list[int] = []

    def on_event(event: dict) -> None:
        events.append(event)
        # A step event comes a second or more into an epoch: the worker is mid-epoch.
        if event["type"] == "step" and event["epoch"] == KILL_IN_EPOCH and not killed:
            pids = train_worker_pids(dashboard)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    dashboard = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False).dashboard_url
    try:
        config = small_job(data, name="killed", epochs=EPOCHS, workers=1, batch_size=16, max_failures=1)
        result = train(config, storage=str(tmp_path / "runs"), on_event=on_event)
        survivors = train_worker_pids(dashboard)
    finally:
        ray.shutdown()

    assert killed, "no step event arrived in epoch 2; the worker was never killed"
    assert killed[0] not in survivors
    resumed = [e for e in events if e["type"] == "resumed"]
    assert [e["epoch"] for e in resumed] == [KILL_IN_EPOCH - 1]  # the new worker resumed from epoch 1's checkpoint
    finished = [e["epoch"] for e in events if e["type"] == "epoch_end"]
    assert finished == list(range(1, EPOCHS + 1))  # the killed epoch 2 never finished; the restart redid it once

    acc = EventAccumulator(os.path.join(result.run_dir, "tensorboard"))
    acc.Reload()
    for tag in ("val/accuracy", "train/loss"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, EPOCHS + 1)), tag
    history = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert [int(m["epoch"]) for m in history] == list(range(1, EPOCHS + 1))
    assert [m["val.accuracy"] for m in history] == pytest.approx([e.value for e in acc.Scalars("val/accuracy")], rel=1e-6)
    assert json.load(open(os.path.join(result.export_dir, "metrics.json")))["epoch"] in range(1, EPOCHS + 1)

"""The local Ray that mmray starts: its workers do the user's work at the user's priority."""
from __future__ import annotations

import os

import pytest

from mmray.runtime import ensure_ray

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_local_ray_workers_run_at_the_callers_priority(monkeypatch):
    # Ray's default puts workers at nice 15, below every ordinary process on the machine: a trial then
    # loses its core to any background job, while the same loop run by hand would not.
    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # the suite's own setting (conftest): mmray's, here
    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(num_cpus=1)
    try:
        worker_nice = ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert worker_nice == os.nice(0)

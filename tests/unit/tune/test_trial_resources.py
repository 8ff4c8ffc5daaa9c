"""How many trials run at once and what each reserves, for CPU, multi-worker and fractional-GPU jobs."""
from __future__ import annotations

import pytest

from mmray.config import validate_job
from mmray.tune import sweep
from mmray.tune.space import SpaceConfig


def _job(**scaling):
    return validate_job({"name": "r", "data": {"path": "data/synth"}, "scaling": scaling})


def _space(samples: int = 16, cap: int | None = None) -> SpaceConfig:
    return SpaceConfig.model_validate({"num_samples": samples, "max_concurrent_trials": cap,
                                       "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})


@pytest.fixture
def cluster(monkeypatch):
    import ray

    def set_resources(**resources):
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    return set_resources


def test_quarter_gpus_put_four_trials_on_one_gpu(cluster):
    config = _job(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=1)
    assert sweep.trial_footprint(config)["GPU"] == 0.25
    cluster(CPU=16, GPU=1)
    assert sweep.concurrency(_space(), config) == 4  # the GPU is the limit, not the 16 CPUs
    cluster(CPU=16, GPU=2)
    assert sweep.concurrency(_space(), config) == 8
    assert sweep.concurrency(_space(cap=3), config) == 3  # the space's cap wins
    assert sweep.trial_resources(config) == {"CPU": 0.01}  # the trial's driver; its worker holds the GPU share


def test_whole_gpus_and_multi_worker_trials(cluster):
    cluster(CPU=16, GPU=4)
    assert sweep.concurrency(_space(), _job(use_gpu=True, num_workers=2, cpus_per_worker=1)) == 2
    cluster(CPU=2)
    cpu_only = _job()
    assert sweep.concurrency(_space(), cpu_only) == int(2 // sweep.CPUS_PER_TRIAL)
    assert sweep.concurrency(_space(samples=1), cpu_only) == 1  # never more trials at once than trials

"""`--time-budget` on a real local Ray: no trial starts after the budget, and the running ones are stopped with
their checkpoints kept. Event-driven: the trials never end by themselves, and the budget's clock runs out
exactly when both running trials have reported (no sleep, no wall-clock race)."""
from __future__ import annotations

import json
import os

import pytest
from helpers import small_job

from mmray.tune.clock import SweepClock

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SLOTS = 2


class SpentOnceTwoTrialsReported(SweepClock):
    """The budget's clock: still at 0 until two trials have reported, then far past any budget."""

    def now(self) -> float:
        return 1e9 if len(self.best) >= SLOTS else 0.0


@pytest.fixture()
def ray_local():
    import ray

    ray.init(address="local", num_cpus=SLOTS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_budget_stops_launching_trials_and_stops_the_running_ones(tmp_path, monkeypatch, ray_local):
    import mmray.tune.clock
    import mmray.tune.sweep as sweep
    from mmray.tune.budget import read_ledger
    from mmray.tune.space import SpaceConfig

    def _endless_trial(params, *, job_raw, experiment_dir, **_):  # a closure: shipped to the trial by value
        """Reports epoch after epoch (a checkpoint with the first) and never finishes: only a stop ends it. Tune
        stops a function trial at its next report, as it stops a real one at the end of its epoch."""
        import tempfile
        import time

        from ray import tune

        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "weights.json"), "w") as f:
                json.dump(params, f)
            tune.report({"epoch": 1, "val.accuracy": 0.5, "val.loss": 1.0},
                        checkpoint=tune.Checkpoint.from_directory(d))
        for epoch in range(2, 2000):  # "never": the bound only ends a broken test
            time.sleep(0.05)  # pacing only: the test waits on the stop, not on this
            tune.report({"epoch": epoch, "val.accuracy": 0.4, "val.loss": 1.0})

    monkeypatch.setattr(sweep, "_run_trial", _endless_trial)
    monkeypatch.setattr(mmray.tune.clock, "SweepClock", SpentOnceTwoTrialsReported)
    os.makedirs(tmp_path / "data")
    job_raw = small_job(str(tmp_path / "data"), workers=1, epochs=3).model_dump(mode="json")
    space = SpaceConfig.model_validate({
        "num_samples": None, "time_budget_s": 60.0, "max_concurrent_trials": SLOTS, "max_failures": 0,
        "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})
    exp = str(tmp_path / "runs" / "exp")
    os.makedirs(exp)
    setup = sweep.SweepSetup(exp, job_raw, space)

    results = sweep._tuner(setup, restore=False).fit()

    started = [r for r in results if r.metrics]
    assert len(started) == SLOTS  # the searcher would give trials forever: the budget stopped the launches
    assert len(results) <= SLOTS + 1  # at most one more queued, never started
    for r in started:
        assert r.checkpoint is not None and r.error is None  # stopped cleanly, its checkpoint kept
    ledger = read_ledger(exp)
    assert ledger.exhausted and ledger.budget_s == 60.0
    assert {r.metrics["trial_id"] for r in started} <= set(ledger.stopped_by_budget)

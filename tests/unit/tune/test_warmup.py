"""Trial actors and Ray's idle workers: Tune's Lightning-only env var is dropped for the sweep and put back after."""
from __future__ import annotations

from ray.tune.execution import class_cache

from mmray.tune.warmup import LIGHTNING_ONLY, idle_workers_for_trials, trials_can_take_idle_workers


def test_trial_actors_get_no_runtime_env_inside_and_tunes_default_is_back_after(monkeypatch):
    for var in class_cache.ENV_VARS_TO_PROPAGATE:
        monkeypatch.delenv(var, raising=False)
    before = dict(class_cache.DEFAULT_ENV_VARS)
    assert trials_can_take_idle_workers()
    with idle_workers_for_trials() as shared:
        assert shared
        assert LIGHTNING_ONLY not in class_cache.DEFAULT_ENV_VARS
    assert class_cache.DEFAULT_ENV_VARS == before


def test_a_variable_tune_copies_to_its_actors_keeps_them_in_processes_of_their_own(monkeypatch):
    """With e.g. AWS credentials set, Tune gives the trial actors a runtime env anyway: no idle worker would fit, so
    nothing is preloaded and Tune's default stays."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    before = dict(class_cache.DEFAULT_ENV_VARS)
    assert not trials_can_take_idle_workers()
    with idle_workers_for_trials() as shared:
        assert not shared and class_cache.DEFAULT_ENV_VARS == before

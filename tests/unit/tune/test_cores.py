"""How the sweep's cores are split between running trials, and the busy-core fraction (no Ray started)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mmray.tune.cores import CoreBalancer, split_cores
from mmray.tune.experiment import read_cores


def test_one_core_each_while_trials_wait_then_the_free_cores_are_shared():
    assert split_cores(8, ["a", "b", "c"], waiting=2) == {"a": 1, "b": 1, "c": 1}
    assert split_cores(8, ["a", "b", "c"], waiting=0) == {"a": 3, "b": 3, "c": 2}  # started first, remainder first
    assert split_cores(2, ["a"], waiting=0) == {"a": 2}
    assert split_cores(2, ["a", "b", "c"], waiting=0) == {"a": 1, "b": 1, "c": 1}  # never below the reserved core
    assert split_cores(2, [], waiting=0) == {}


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def trials(**status):
    return [SimpleNamespace(trial_id=t, status=s) for t, s in status.items()]


def test_the_last_trial_gets_the_cores_the_others_leave_and_busy_time_is_measured(tmp_path):
    clock, published = Clock(), []
    b = CoreBalancer(cpus=2, total_trials=3, key="x", experiment_dir=str(tmp_path), clock=clock,
                     publish=published.append)
    b.setup()
    b.on_step_end(0, trials(a="RUNNING", b="RUNNING"))  # a third trial is still to come
    clock.now = 10
    b.on_step_end(0, trials(a="TERMINATED", b="RUNNING", c="RUNNING"))
    clock.now = 20
    b.on_step_end(0, trials(a="TERMINATED", b="TERMINATED", c="RUNNING"))  # c alone: both cores
    b.on_step_end(0, trials(a="TERMINATED", b="TERMINATED", c="RUNNING"))  # unchanged: not published again
    clock.now = 30
    b.on_step_end(0, trials(a="TERMINATED", b="TERMINATED", c="TERMINATED"))
    clock.now = 40
    b.on_experiment_end([])
    assert published == [{"a": 1, "b": 1}, {"b": 1, "c": 1}, {"c": 2}, {}]
    # 2 cores for 30 s, then none for the last 10 s: 60 of 80 CPU-seconds
    assert b.busy_fraction() == pytest.approx(0.75)
    assert read_cores(str(tmp_path)) == {"cpus": 2, "wall_s": 40.0, "busy_cpu_s": 60.0, "busy_fraction": 0.75}
    assert json.loads((tmp_path / "cores.json").read_text())["busy_fraction"] == 0.75


def test_no_record_means_no_figure(tmp_path):
    assert read_cores(str(tmp_path)) is None

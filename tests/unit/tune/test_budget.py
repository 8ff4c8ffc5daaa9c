"""`--time-budget`: its parsing, the stopper's arithmetic on a clock the test drives, and the ledger's lines."""
from __future__ import annotations

import pytest

from mmray.config.errors import UserError
from mmray.tune.budget import Ledger, format_duration, parse_duration, read_ledger, spending_lines
from mmray.tune.clock import SweepClock  # imports ray.tune; starts nothing


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("20M", 1200), ("45", 45),
                                          (" 2m ", 120), (".5m", 30)])
def test_durations_take_seconds_minutes_or_hours(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 min", "1d", "0", "0s", "-2m", "m", "", "1e3s"])
def test_a_bad_duration_names_the_flag_and_the_value(text):
    with pytest.raises(UserError, match=r"^--time-budget: .*" + __import__("re").escape(repr(text))):
        parse_duration(text)


def test_durations_read_back_plainly():
    assert [format_duration(s) for s in (42, 297.1, 3720)] == ["42s", "4m57s", "1h02m"]


class _Trial:
    def __init__(self, trial_id, status="RUNNING", is_saving=False):
        self.trial_id, self.status, self.is_saving = trial_id, status, is_saving


class Driven(SweepClock):
    """The sweep's clock at the time the test sets."""

    t = 0.0

    def now(self):
        return self.t


def _clock(tmp_path, budget):
    return Driven(str(tmp_path), budget, "val.accuracy", "max")


def test_the_budget_stops_the_sweep_once_spent_naming_the_trials_it_cut(tmp_path):
    clock = _clock(tmp_path, 60.0)
    trials = [_Trial("a"), _Trial("b"), _Trial("c", "TERMINATED")]
    clock.on_step_begin(0, trials)
    assert not clock.stop_all()
    clock.t = 30.0
    clock.on_trial_result(1, trials, trials[0], {"val.accuracy": 0.5})
    clock.on_trial_result(1, trials, trials[0], {"val.accuracy": 0.4})  # not its best: not noted
    clock.on_step_begin(1, trials)
    assert not clock.stop_all()
    clock.t = 61.0
    trials[1].is_saving = True
    clock.on_step_begin(2, trials)
    assert not clock.stop_all()  # b's checkpoint is being saved: stopping now would drop it
    trials[1].is_saving = False
    assert clock.stop_all() and clock.stop_all()  # stays spent
    clock.on_experiment_end(trials)
    ledger = read_ledger(str(tmp_path))
    assert ledger.exhausted and ledger.budget_s == 60.0 and ledger.elapsed_s == 61.0
    assert ledger.stopped_by_budget == ["a", "b"] and ledger.best_at_s == {"a": 30.0}


def test_without_a_budget_the_clock_only_keeps_the_ledger(tmp_path):
    clock = _clock(tmp_path, None)
    clock.on_step_begin(0, [_Trial("a")])
    clock.t = 1e6
    assert not clock.stop_all()


def test_a_resumed_sweep_continues_with_the_budget_it_had_left(tmp_path):
    import pickle

    clock = _clock(tmp_path, 60.0)
    clock.on_step_begin(0, [])
    clock.t = 50.0
    clock.on_step_begin(1, [])
    restored = pickle.loads(pickle.dumps(clock))
    restored.t = 10_000.0  # the pause between the two runs does not count
    restored.on_step_begin(2, [])
    assert not restored.stop_all()
    restored.t = 10_011.0
    assert restored.stop_all()


def test_the_summary_says_how_the_budget_was_spent():
    ledger = Ledger(300.0, 301.0, True, ["c", "d"], {"a": 84.0})
    lines = spending_lines(ledger, {"a": "completed", "b": "stopped", "c": "budget", "d": "budget",
                                    "e": "pending"}, "a")
    assert lines == ["search time budget 5m00s, used 5m01s: 4 trials ran (1 completed, 1 stopped early (ASHA or "
                     "patience), 2 stopped by the budget)",
                     "the best trial's best epoch came 1m24s into the sweep"]
    assert spending_lines(Ledger(), {"a": "completed"}, "a") == []

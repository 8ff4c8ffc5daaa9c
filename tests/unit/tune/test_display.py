"""The live sweep display, fed fake trial events the way Ray Tune's callback hooks deliver them (no Ray started)."""
from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import cloudpickle

from mmray.tune.display import SweepDisplay, SweepProgress

PARAMS = ["train.optimizer.lr", "model.fusion.name"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def trial(trial_id: str, lr: float, fusion: str, epochs: int = 4, error: str = ""):
    return SimpleNamespace(trial_id=trial_id, config={"train.optimizer.lr": lr, "model.fusion.name": fusion,
                                                      "epochs": epochs},
                           status="RUNNING", last_result={}, get_error=lambda: error)


def display(tty: bool = False, total: int = 4):
    clock = Clock()
    progress = SweepProgress(metric="val.accuracy", mode="max", parameters=PARAMS, total=total, scheduler="asha",
                             clock=clock)
    out = io.StringIO()
    d = SweepDisplay(progress, epochs_of=lambda config: config["epochs"], stream=out, tty=tty, summary_every_s=60)
    d.setup()
    return d, out, clock


def result(d: SweepDisplay, t, epoch: int, acc: float, done: bool = False, **extra):
    d.on_trial_result(0, [], t, {"epoch": epoch, "val.accuracy": acc, "done": done, **extra})


def test_one_line_per_trial_event_when_not_a_terminal():
    d, out, clock = display()
    a, b, c, f = trial("a_00000", 3e-3, "gated"), trial("a_00001", 1e-4, "concat"), trial("a_00002", 1e-2, "late", 2), \
        trial("a_00003", 0.1, "attention", error="Traceback ...\nValueError: loss is nan")
    for t in (a, b, c, f):
        d.on_trial_start(0, [], t)
    for epoch, acc in enumerate([0.5, 0.6, 0.7, 0.65], 1):
        result(d, a, epoch, acc, done=epoch == 4)
    result(d, b, 1, 0.3)
    result(d, b, 2, 0.35, done=True)  # the scheduler's STOP arrives as done=True before the last epoch
    result(d, c, 1, 0.4)
    result(d, c, 2, 0.42)
    result(d, f, 1, 0.1)
    for t in (a, b, c):
        d.on_trial_complete(0, [], t)
    d.on_trial_error(0, [], f)
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["mmray trial a_00000 started: optimizer.lr=0.003 fusion.name=gated",
                         "mmray trial a_00001 started: optimizer.lr=0.0001 fusion.name=concat",
                         "mmray trial a_00002 started: optimizer.lr=0.01 fusion.name=late",
                         "mmray trial a_00003 started: optimizer.lr=0.1 fusion.name=attention"]
    assert lines[4] == "mmray trial a_00000 completed 4 epochs: best val.accuracy 0.7000 at epoch 3"
    assert lines[5] == "mmray trial a_00001 stopped by ASHA at epoch 2: best val.accuracy 0.3500 at epoch 2"
    assert lines[6] == "mmray trial a_00002 completed 2 epochs: best val.accuracy 0.4200 at epoch 2"
    assert lines[7] == "mmray trial a_00003 failed at epoch 1: ValueError: loss is nan"
    assert len(lines) == 8  # no summary before a minute has passed, no table
    d.on_experiment_end([])
    assert out.getvalue().splitlines()[-1] == (
        "mmray sweep: 4/4 trials done (2 completed, 1 stopped, 1 failed), 0 running, 0 pending, "
        "best val.accuracy 0.7000 (trial a_00000), elapsed 0s")


def test_a_trial_that_stops_itself_early_is_not_blamed_on_the_scheduler():
    d, out, _ = display()
    t = trial("a_00000", 3e-3, "gated", epochs=8)
    d.on_trial_start(0, [], t)
    result(d, t, 1, 0.5)
    result(d, t, 2, 0.4)
    d.on_trial_complete(0, [], t)  # returned by itself (train.early_stopping) after epoch 2 of 8
    assert out.getvalue().splitlines()[-1] == \
        "mmray trial a_00000 stopped early (train.early_stopping) at epoch 2: best val.accuracy 0.5000 at epoch 1"


def test_a_summary_line_every_minute_with_an_eta():
    d, out, clock = display(total=4)
    a, b = trial("a_00000", 3e-3, "gated"), trial("a_00001", 1e-3, "late")
    d.on_trial_start(0, [], a)
    d.on_trial_start(0, [], b)
    clock.now += 30
    result(d, a, 1, 0.5)
    result(d, b, 1, 0.6)
    d.on_step_end(0, [a, b])
    assert "mmray sweep:" not in out.getvalue()  # 30 s: not yet
    clock.now += 30
    d.on_step_end(0, [a, b])
    summary = out.getvalue().splitlines()[-1]
    # 2 epochs in 60 s; left: 3 + 3 epochs of the running trials, 2 pending trials x 4 epochs = 14 epochs -> 7 min
    assert summary == ("mmray sweep: 0/4 trials done (0 completed, 0 stopped, 0 failed), 2 running, 2 pending, "
                       "best val.accuracy 0.6000 (trial a_00001), elapsed 1m00s, ETA 7m00s")
    d.on_step_end(0, [a, b])
    assert out.getvalue().count("mmray sweep:") == 1  # once a minute, not once a step


def test_terminal_table_has_the_columns_and_highlights_the_best_few():
    from rich.console import Console

    d, out, clock = display(tty=True, total=5)
    trials = [trial(f"a_0000{i}", 10.0 ** -(i + 1), "gated") for i in range(5)]
    for i, t in enumerate(trials):
        d.on_trial_start(0, [], t)
        result(d, t, 1, 0.1 * (i + 1))
    clock.now += 75
    d.close()
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    view = d.progress.view()
    console.print(view)
    text = console.file.getvalue()
    plain = Console(file=io.StringIO(), width=200, color_system=None)
    plain.print(view)
    shown = plain.file.getvalue()
    header = shown.splitlines()[0]
    assert header.startswith("0/5 trials done") and "5 running" in header
    assert "best val.accuracy 0.5000 (trial a_00004)" in header and "elapsed 1m15s" in header and "ETA" in header
    for header in ("trial", "status", "optimizer.lr", "fusion.name", "epoch", "val.accuracy", "best", "elapsed"):
        assert header in shown
    assert "1/4" in shown and "1m15s" in shown
    bold_green = "\x1b[1;32m"
    highlighted = [line for line in text.splitlines() if bold_green in line]
    assert len(highlighted) == 3 and all(any(t in line for t in ("a_00004", "a_00003", "a_00002"))
                                         for line in highlighted)
    assert "mmray trial" not in out.getvalue()  # no event lines on a terminal: the table says it all


def test_a_resumed_sweep_counts_the_trials_that_had_finished():
    d, out, _ = display(total=3)
    done = trial("a_00000", 3e-3, "gated")
    done.status, done.last_result = "TERMINATED", {"epoch": 4, "val.accuracy": 0.8}
    d.on_step_end(0, [done])
    assert d.progress.counts()["completed"] == 1 and d.progress.counts()["pending"] == 2
    assert out.getvalue() == ""


def test_the_display_pickles_without_its_stream():
    d, out, _ = display()
    again = pickle.loads(cloudpickle.dumps(d))  # Tune stores its run config (callbacks included) for --resume
    assert again.stream is not out and again.progress.metric == "val.accuracy"


def test_a_budgeted_sweep_shows_the_time_left_and_no_unused_conditional_parameters():
    clock = Clock()
    progress = SweepProgress(metric="val.accuracy", mode="max", parameters=[*PARAMS, "model.fusion.rank"],
                             total=None, scheduler="asha", budget_s=300, spent_s=60, clock=clock)
    out = io.StringIO()
    d = SweepDisplay(progress, epochs_of=lambda config: config["epochs"], stream=out, tty=False, summary_every_s=60)
    d.setup()
    t = trial("a_00000", 3e-3, "concat")
    t.config["model.fusion.rank"] = None  # concat has no rank: Optuna leaves the conditional parameter unset
    d.on_trial_start(0, [], t)
    clock.now += 60
    result(d, t, 1, 0.5)
    d.on_step_end(0, [t])
    lines = out.getvalue().splitlines()
    assert lines[0] == "mmray trial a_00000 started: optimizer.lr=0.003 fusion.name=concat"
    # a resumed sweep had spent 1 minute of its 5 before this one ran for 1 more: 3 left; no count of trials
    assert lines[-1] == ("mmray sweep: 0 trials done (0 completed, 0 stopped, 0 failed), 1 running, "
                         "best val.accuracy 0.5000 (trial a_00000), elapsed 1m00s, search budget 5m00s, 3m00s left")

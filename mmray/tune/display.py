"""What a person watching ``mmray tune`` sees while the trials run: the sweep's only progress output.

On a terminal, one table redrawn in place (``rich``): each trial's status, swept parameters, epoch, current and
best metric and elapsed time, the best few highlighted, under a header with the trials done/running/stopped,
the best so far, the elapsed time and an ETA. Elsewhere (a CI log, a file), one line per trial event (started
with its parameters, stopped by the scheduler at epoch N, completed with its best metric, failed with the
reason) and a summary line every minute. Ray Tune's own reporter is switched off (``verbose=0`` in
:mod:`mmray.tune.sweep`), so its trial tables never reach the user.

:class:`SweepProgress` holds the state and writes the text (no Ray); :class:`SweepDisplay` is the Ray Tune
callback that feeds it from the trial events.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ray.tune import Callback

from mmray.train.progress import _duration

SUMMARY_EVERY_S = 60.0  # a summary line this often when not on a terminal
REDRAW_EVERY_S = 0.5  # the live table at most this often
HIGHLIGHTED = 3  # the best few trials are highlighted in the table
SCHEDULER_NAMES = {"asha": "ASHA", "median": "median stopping"}
FINISHED = ("completed", "stopped", "early-stopped", "failed")


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    epochs: int  # the epochs this trial is set to train
    status: str = "pending"  # running | completed | stopped (scheduler) | early-stopped (patience) | failed
    epoch: int = 0
    current: float | None = None
    best: float | None = None
    best_epoch: int | None = None
    started: float | None = None
    ended: float | None = None
    reason: str = ""  # why it failed
    stopping: bool = False  # the scheduler's last decision was to stop it
    cpus: float | None = None  # its current CPU share (resource-changing scheduler)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


class SweepProgress:
    """The sweep's trials as a person follows them; every method that changes state returns the event line."""

    def __init__(self, *, metric: str, mode: str, parameters: list[str], total: int | None, scheduler: str = "",
                 budget_s: float | None = None, spent_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.metric, self.mode, self.parameters, self.total = metric, mode, parameters, total
        # the search's time budget and what a resumed sweep had already spent of it (header: time left)
        self.budget_s, self.spent_s = budget_s, spent_s
        self.scheduler = SCHEDULER_NAMES.get(scheduler, scheduler or "the scheduler")
        self.clock = clock
        self.start = clock()
        self.rows: dict[str, TrialRow] = {}

    # ------------------------------------------------------------------ events
    def started(self, trial_id: str, params: dict[str, Any], epochs: int) -> str:
        row = self.rows.get(trial_id)
        if row is None:
            row = self.rows[trial_id] = TrialRow(trial_id, {k: params.get(k) for k in self.parameters}, epochs)
        resumed = row.epoch > 0
        row.status, row.started, row.ended, row.stopping = "running", row.started or self.clock(), None, False
        if resumed:
            return f"mmray trial {trial_id} restarted after epoch {row.epoch}"
        # a conditional parameter the trial does not use (e.g. fusion.rank of a concat trial) is not shown
        shown = " ".join(f"{self._label(k)}={_value(v)}" for k, v in row.params.items() if v is not None)
        return f"mmray trial {trial_id} started: {shown}".rstrip()

    def result(self, trial_id: str, metrics: dict[str, Any], *, stopping: bool = False) -> None:
        row = self.rows.get(trial_id)
        if row is None:
            return
        row.epoch = int(metrics.get("epoch", row.epoch + 1))
        value = metrics.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            row.current = float(value)
            if not metrics.get("train.contrastive_pretraining") and self._better(row.current, row.best):
                row.best, row.best_epoch = row.current, row.epoch
        if "cpu_share" in metrics:
            row.cpus = float(metrics["cpu_share"])
        row.stopping = stopping

    def completed(self, trial_id: str) -> str:
        row = self.rows.get(trial_id)
        if row is None:
            return ""
        row.ended = self.clock()
        best = f"best {self.metric} {_metric(row.best)} at epoch {row.best_epoch}" if row.best is not None \
            else f"no {self.metric}"
        if row.epoch >= row.epochs:
            row.status = "completed"
            return f"mmray trial {trial_id} completed {row.epoch} epochs: {best}"
        if row.stopping:
            row.status = "stopped"
            return f"mmray trial {trial_id} stopped by {self.scheduler} at epoch {row.epoch}: {best}"
        row.status = "early-stopped"
        return f"mmray trial {trial_id} stopped early (train.early_stopping) at epoch {row.epoch}: {best}"

    def failed(self, trial_id: str, reason: str) -> str:
        row = self.rows.get(trial_id)
        if row is None:
            return ""
        row.status, row.ended, row.reason = "failed", self.clock(), reason
        return f"mmray trial {trial_id} failed at epoch {row.epoch}: {reason}"

    def restored(self, trial_id: str, params: dict[str, Any], epochs: int, last: dict[str, Any], *,
                 failed: bool = False) -> None:
        """A trial that had finished before this sweep was resumed: counted, not announced."""
        row = self.rows[trial_id] = TrialRow(trial_id, {k: params.get(k) for k in self.parameters}, epochs)
        self.result(trial_id, last)
        row.status = "failed" if failed else "completed" if row.epoch >= epochs else "stopped"

    def restarted(self, trial_id: str, reason: str) -> str:
        row = self.rows.get(trial_id)
        if row is None:
            return ""
        row.status = "pending"
        return f"mmray trial {trial_id} failed at epoch {row.epoch} and will restart from its checkpoint: {reason}"

    # ------------------------------------------------------------------ views
    def counts(self) -> dict[str, int]:
        rows = self.rows.values()
        out = {s: sum(r.status == s for r in rows) for s in ("running", *FINISHED)}
        # total None: trials start while a time budget lasts, so none is counted as waiting
        out["pending"] = max(0, (self.total or 0) - sum(r.status != "pending" for r in rows))
        return out

    def best_row(self) -> TrialRow | None:
        scored = [r for r in self.rows.values() if r.best is not None]
        if not scored:
            return None
        return max(scored, key=lambda r: r.best if self.mode == "max" else -r.best)

    def eta(self) -> float | None:
        """Seconds left: the epochs still expected (running trials to their end, the pending ones as many as
        the finished trials ran on average) at the sweep's rate of epochs per second so far."""
        rows = list(self.rows.values())
        done_epochs = sum(r.epoch for r in rows)
        elapsed = self.clock() - self.start
        if done_epochs == 0 or elapsed <= 0:
            return None
        finished = [r.epoch for r in rows if r.finished]
        typical = sum(finished) / len(finished) if finished else max((r.epochs for r in rows), default=1)
        running = sum(max(0.0, min(r.epochs, max(typical, r.epoch + 1)) - r.epoch)
                      for r in rows if r.status == "running")
        left = running + self.counts()["pending"] * typical
        return left / (done_epochs / elapsed)

    def header(self) -> str:
        c = self.counts()
        done = sum(c[s] for s in FINISHED)
        parts = [f"{done}{f'/{self.total}' if self.total else ''} trials done ({c['completed']} completed, "
                 f"{c['stopped'] + c['early-stopped']} stopped, {c['failed']} failed)", f"{c['running']} running"]
        if self.total:
            parts.append(f"{c['pending']} pending")
        best = self.best_row()
        if best is not None:
            parts.append(f"best {self.metric} {_metric(best.best)} (trial {best.trial_id})")
        elapsed = self.clock() - self.start
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.budget_s is not None:
            left = max(0.0, self.budget_s - self.spent_s - elapsed)
            parts.append(f"search budget {_duration(self.budget_s)}, {_duration(left)} left")
        eta = self.eta()
        if eta is not None and self.total and done < self.total:
            parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts)

    def summary_line(self) -> str:
        return f"mmray sweep: {self.header()}"

    def table(self):
        """One row per trial that has started, the best few highlighted."""
        from rich.table import Table

        table = Table(expand=False)
        table.add_column("trial")
        table.add_column("status")
        for k in self.parameters:
            table.add_column(self._label(k), justify="right")
        table.add_column("epoch", justify="right")
        show_cpus = any(r.cpus is not None for r in self.rows.values())
        if show_cpus:
            table.add_column("cpus", justify="right")
        table.add_column(self.metric, justify="right")
        table.add_column("best", justify="right")
        table.add_column("elapsed", justify="right")
        ranked = sorted((r for r in self.rows.values() if r.best is not None),
                        key=lambda r: -r.best if self.mode == "max" else r.best)
        top = {r.trial_id for r in ranked[:HIGHLIGHTED]}
        for row in self.rows.values():
            if row.started is None:
                continue
            elapsed = (row.ended or self.clock()) - row.started
            cells = [row.trial_id, row.status, *(_value(row.params.get(k)) for k in self.parameters),
                     f"{row.epoch}/{row.epochs}"]
            if show_cpus:
                cells.append("-" if row.cpus is None else f"{row.cpus:g}")
            cells += [_metric(row.current), _metric(row.best), _duration(elapsed)]
            style = "bold green" if row.trial_id in top else "dim" if row.status == "failed" else None
            table.add_row(*cells, style=style)
        return table

    def view(self):
        """What the terminal shows: the header line over the table."""
        from rich.console import Group
        from rich.text import Text

        return Group(Text(self.header(), style="bold"), self.table())

    # ------------------------------------------------------------------ helpers
    def _better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)

    @staticmethod
    def _label(key: str) -> str:
        return key.split(".", 1)[-1]


def _reason(trial) -> str:
    """A failed trial's error in one line: the last line of its traceback (``ValueError: ...``)."""
    text = ""
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - the reason is a courtesy; the trial's error file has it all
        pass
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith("Failure #")]
    return lines[-1] if lines else "see the trial's error.txt"


_LIVE: set["SweepDisplay"] = set()  # live tables on screen, closed by close_displays() if the sweep fails


def close_displays() -> None:
    """Stop every live table still drawing (a sweep that raised or was interrupted): the terminal is the user's again."""
    for display in list(_LIVE):
        display.close()


class SweepDisplay(Callback):
    """Ray Tune callback that renders :class:`SweepProgress`: a live table on a terminal, event lines elsewhere."""

    def __init__(self, progress: SweepProgress, *, epochs_of: Callable[[dict[str, Any]], int],
                 stream: TextIO | None = None, tty: bool | None = None, summary_every_s: float = SUMMARY_EVERY_S):
        self.progress, self.epochs_of = progress, epochs_of
        self._stream, self._tty = stream, tty  # None: sys.stdout, and whether it is a terminal, when the sweep starts
        self.summary_every_s = summary_every_s
        self._live = None
        self._last_draw = self._last_summary = progress.clock()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (this callback included) for --resume: no stream, no live table in there
        return {**self.__dict__, "_stream": None, "_live": None}

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        return self.stream.isatty() if self._tty is None else self._tty

    # Ray Tune callback hooks -------------------------------------------------------
    def setup(self, **info) -> None:
        self.progress.start = self._last_summary = self.progress.clock()
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.progress.view(), console=Console(file=self.stream), auto_refresh=False,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            _LIVE.add(self)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._event(self.progress.started(trial.trial_id, dict(trial.config or {}), self.epochs_of(trial.config)))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.progress.result(trial.trial_id, result, stopping=bool(result.get("done")))
        self._draw()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._event(self.progress.completed(trial.trial_id))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._event(self.progress.failed(trial.trial_id, _reason(trial)))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._event(self.progress.restarted(trial.trial_id, _reason(trial)))

    def on_step_end(self, iteration, trials, **info) -> None:
        for trial in trials:  # a resumed sweep: trials that had finished before never start again
            if trial.trial_id not in self.progress.rows and trial.status in ("TERMINATED", "ERROR"):
                self.progress.restored(trial.trial_id, dict(trial.config or {}), self.epochs_of(trial.config),
                                       dict(trial.last_result or {}), failed=trial.status == "ERROR")
        now = self.progress.clock()
        if not self.tty and now - self._last_summary >= self.summary_every_s:
            self._last_summary = now
            self._line(self.progress.summary_line())
        self._draw()

    def on_experiment_end(self, trials, **info) -> None:
        self.close()

    # rendering -------------------------------------------------------------------
    def close(self) -> None:
        if self._live is not None:
            self._live.update(self.progress.view(), refresh=True)
            self._live.stop()
            self._live = None
            _LIVE.discard(self)
        elif not self.tty:
            self._line(self.progress.summary_line())

    def _event(self, line: str) -> None:
        if line and not self.tty:
            self._line(line)
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if self._live is None:
            return
        now = self.progress.clock()
        if force or now - self._last_draw >= REDRAW_EVERY_S:
            self._last_draw = now
            self._live.update(self.progress.view(), refresh=True)

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

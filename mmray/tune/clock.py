"""The sweep's clock inside Ray Tune: the time budget's stopper and the ledger's callback (see :mod:`mmray.tune.budget`).

A module-level class: Tune pickles it with the experiment, so ``--resume`` continues with the budget left.
"""
from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback, Stopper

from mmray.tune.budget import format_duration, write_ledger


class SweepClock(Callback, Stopper):
    """The sweep's budget and ledger; pass it to Tune as both ``stop`` and one of the ``callbacks``.

    Time is counted between controller steps, like Tune's own ``TimeoutStopper``: a sweep resumed with
    ``--resume`` continues with what its budget had left.
    """

    def __init__(self, experiment_dir: str, budget_s: float | None, metric: str, mode: str):
        self.experiment_dir, self.budget_s, self.metric, self.mode = experiment_dir, budget_s, metric, mode
        self.elapsed = 0.0
        self._last: float | None = None
        self.exhausted = False
        self._trials: list = []  # the controller's own list of trials (live; never pickled)
        self.stopped_by_budget: list[str] = []
        self.best: dict[str, tuple[float, float]] = {}  # trial_id -> (score, seconds from the start)

    # ------------------------------------------------------------------ time
    def now(self) -> float:
        """Seconds on a monotonic clock (tests replace it with one driven by events)."""
        return time.monotonic()

    def tick(self) -> float:
        now = self.now()
        if self._last is not None:
            self.elapsed += now - self._last
        self._last = now
        return self.elapsed

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_last"] = None  # a resumed sweep counts from its own start, not across the pause
        state["_trials"] = []
        return state

    # ------------------------------------------------------------------ Stopper
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.budget_s is None:
            return False
        if self.exhausted:
            return True
        if self.tick() < self.budget_s:
            return False
        # A trial whose checkpoint is being saved would lose it if stopped now (Tune drops the save):
        # wait for the save, a step or two.
        if any(t.is_saving for t in self._trials):
            return False
        self.exhausted = True
        self.stopped_by_budget = [t.trial_id for t in self._trials if t.status not in ("TERMINATED", "ERROR")]
        print(f"mmray: the time budget ({format_duration(self.budget_s)}) is spent: no new trials; stopping "
              f"{len(self.stopped_by_budget)} unfinished, keeping their checkpoints", flush=True)
        return True

    # ------------------------------------------------------------------ Callback
    def on_step_begin(self, iteration: int, trials: list, **info):
        self.tick()
        self._trials = trials

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        score = result.get(self.metric)
        if score is None:
            return
        sign = 1.0 if self.mode == "max" else -1.0
        seen = self.best.get(trial.trial_id)
        if seen is None or sign * score > sign * seen[0]:
            self.best[trial.trial_id] = (float(score), self.tick())

    def on_experiment_end(self, trials: list, **info):
        self.tick()
        write_ledger(self.experiment_dir, self.ledger())

    def get_state(self) -> dict[str, Any]:
        return self.__getstate__()

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k not in ("_last", "_trials")})

    def ledger(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "elapsed_s": round(self.elapsed, 3), "exhausted": self.exhausted,
                "stopped_by_budget": list(self.stopped_by_budget),
                "best_at_s": {k: round(v[1], 3) for k, v in self.best.items()}}

"""Tune schedulers that never stop the sweep's baseline trial (``baseline: true`` in the space).

The baseline's results still count (the other trials are measured against them at each rung); only its
own stop decision is overruled, so the control runs every epoch of the job as is and the winner-vs-baseline
comparison is fair. Module-level classes: Tune pickles the scheduler with the experiment for ``--resume``.
"""
from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

from mmray.tune.baseline import is_baseline


class _KeepBaseline:
    baseline: dict[str, Any]

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        return self.CONTINUE if is_baseline(trial.config, self.baseline) else decision


class ASHAKeepingBaseline(_KeepBaseline, ASHAScheduler):
    def __init__(self, *args, baseline: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline = baseline or {}


class MedianKeepingBaseline(_KeepBaseline, MedianStoppingRule):
    def __init__(self, *args, baseline: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.baseline = baseline or {}

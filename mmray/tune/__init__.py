"""Hyperparameter sweeps: search-space YAML, Ray Tune + Optuna, leaderboard, HParams and the best export.

Names resolve lazily, so ``import mmray.tune`` never imports Ray. The public entry (``mmray tune``) is
:func:`mmray.tune_job` (:func:`mmray.tune.api.tune_job`).
"""
from __future__ import annotations

from mmray._lazy import lazy_exports

_EXPORTS = {
    "tune_job": ".api",
    "SweepSummary": ".results",
    "format_summary": ".results",
    "build_report": ".report",
    "SpaceConfig": ".space",
    "load_space": ".space",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

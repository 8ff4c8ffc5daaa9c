"""Finalists checked twice: before the winner is named, the top-k configurations are trained again with other
seeds, and the winner is the best mean (one seed on a small validation split mostly ranks noise).

The re-runs are a second, small set of Ray Tune trials over the same trainable (in-process trials, the same
loop as the sweep), in ``EXPERIMENT/finalists/``: finalist x seed, ``train.seed`` = the job's seed + 1, + 2, ...
No early stopping (the loop's own ``train.early_stopping`` still applies). A re-run's score is its best epoch's
metric, as a sweep trial's is. With a time budget the re-runs get what the search left of it; a re-run the budget
stopped before it reached its finalist's best epoch is left out of the mean (it never had the chance).

``space.finalists`` (``--finalists K``, 0 = off) and ``space.finalist_seeds`` (re-runs per finalist) say how many.
"""
from __future__ import annotations

import math
import os
from typing import Any

from mmray import storage as store
from mmray.config import validate_job

FINALISTS_DIR = "finalists"
SEARCH_SHARE = 0.75  # of a time budget, when finalists are re-checked: the rest is theirs


def search_budget(space) -> float | None:
    """The part of the sweep's time budget the search may use (all of it without finalists)."""
    if space.time_budget_s is None:
        return None
    return space.time_budget_s * (SEARCH_SHARE if space.finalists else 1.0)


def pick(trials: list, k: int) -> list:
    """The top ``k`` scored trials of a ranked list (errors and never-scored trials are not finalists)."""
    return [t for t in trials if t.best_epoch is not None and t.status != "error"][:k]


def mean_sd(scores: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one score)."""
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))


def rank(trials: list, metric: str, mode: str) -> list:
    """Re-checked trials first, by the mean of all their runs; then the rest by their one run, as before."""
    sign = 1 if mode == "max" else -1
    checked = sorted((t for t in trials if t.rechecks), key=lambda t: -sign * mean_sd(t.scores(metric))[0])
    return checked + [t for t in trials if not t.rechecks]


def _run_recheck(config: dict[str, Any], *, finalist_params: dict[str, dict[str, Any]], job_raw: dict[str, Any],
                 experiment_dir: str) -> None:
    """One re-run: a finalist's parameters with another seed, trained as a sweep trial is."""
    from mmray.tune.sweep import _run_trial

    params = {**finalist_params[config["finalist"]], "train.seed": config["train.seed"]}
    _run_trial(params, job_raw=job_raw, experiment_dir=experiment_dir)


def _score(result, metric: str, mode: str) -> tuple[float | None, int]:
    """(best-epoch metric, epochs run) of a re-run, from what it reported (contrastive pre-training excluded)."""
    try:
        rows = result.metrics_dataframe.to_dict("records")
    except Exception:  # noqa: BLE001 - no result at all
        return None, 0
    rows = [r for r in rows if metric in r and r[metric] == r[metric] and not r.get("train.contrastive_pretraining")]
    if not rows:
        return None, 0
    sign = 1 if mode == "max" else -1
    return max(sign * float(r[metric]) for r in rows) * sign, max(int(r.get("epoch", 0)) for r in rows)


def recheck(setup, trials: list, *, budget_left: float | None = None) -> None:
    """Train the top ``space.finalists`` of the ranked ``trials`` again with ``space.finalist_seeds`` other seeds
    and set each finalist's ``rechecks`` (the re-runs' scores). Needs Ray running (the sweep's)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from mmray.tune.clock import SweepClock
    from mmray.tune.sweep import concurrency, trial_resources

    space = setup.space
    chosen = pick(trials, space.finalists)
    if len(chosen) < 2:  # one finalist (or none) is the winner already
        return
    config = validate_job(setup.job_raw)
    metric, mode = space.metric, space.resolved_mode
    exp = store.join(setup.experiment_dir, FINALISTS_DIR)
    store.remove(exp)  # a re-check cut short by a killed sweep starts again
    seeds = [config.train.seed + i for i in range(1, space.finalist_seeds + 1)]
    params = {t.trial_id: dict(t.params) for t in chosen}
    trainable = tune.with_resources(
        tune.with_parameters(_run_recheck, finalist_params=params, job_raw=setup.job_raw, experiment_dir=exp),
        trial_resources(config))
    clock = SweepClock(exp, budget_left, metric, mode)
    print(f"mmray: checking the top {len(chosen)} trials twice: {len(seeds)} more seed(s) each "
          f"({len(chosen) * len(seeds)} runs)", flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    results = tune.Tuner(
        trainable,
        param_space={"finalist": tune.grid_search(list(params)), "train.seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(space, config), reuse_actors=True),
        run_config=tune.RunConfig(name=store.split(exp)[1], storage_path=store.split(exp)[0], stop=clock,
                                  callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), clock], verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    ).fit()
    by_id = {t.trial_id: t for t in chosen}
    for r in results:
        score, epochs = _score(r, metric, mode)
        cfg = r.config or {}
        t = by_id.get(cfg.get("finalist"))
        if t is None or score is None:
            continue
        cut = (r.metrics or {}).get("trial_id") in clock.stopped_by_budget
        if r.error is None and (not cut or epochs >= (t.best_epoch or 0)):
            t.rechecks.append(score)

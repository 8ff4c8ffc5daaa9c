"""Finalists checked twice: before the winner is named, the top-k configurations are trained again with other
seeds, or scored by K-fold cross-validation over train+val, and the winner is the best mean (one seed on a small
validation split mostly ranks noise).

The runs are a second, small set of Ray Tune trials over the same trainable (in-process trials, the same loop as
the sweep), in ``EXPERIMENT/finalists/``:

- re-runs with other seeds (``space.finalist_seeds`` per finalist): finalist x seed, ``train.seed`` = the job's
  seed + 1, + 2, ...; a finalist's runs are its own and its re-runs;
- K-fold cross-validation (``space.finalists_cv``, ``--finalists-cv K``): finalist x fold. The train and val rows
  are dealt into K folds stratified by label, seeded with the job's ``train.seed`` (:mod:`mmray.data.folds`; the
  same folds for every finalist, recorded in ``folds.json``); each run trains on K-1 folds and validates on the
  held-out one, with the job's epochs and early stopping. Its rows are read from the decoded-input cache (a fold
  is a row subset of it, nothing is decoded again), so only in-process trials can be cross-validated. A
  finalist's runs are its K folds (its sweep run, validated on the val split alone, is not one of them).

No scheduler stops a run early (the loop's own ``train.early_stopping`` still applies). A run's score is its best
epoch's metric, as a sweep trial's is. With a time budget the runs get what the search left of it; a run the
budget stopped before it reached its finalist's best epoch is left out of the mean (it never had the chance).
``best/`` stays the winner's own best checkpoint (see the README on why there is no refit on train+val).

``space.finalists`` (``--finalists K``, 0 = off) says how many.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides
from mmray.data import decoded
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.folds import check_fold_count, make_folds
from mmray.tune.experiment import FINALISTS_DIR, mean_sd, write_folds

SEARCH_SHARE = 0.75  # of a time budget, when finalists are re-checked: the rest is theirs


def search_budget(space) -> float | None:
    """The part of the sweep's time budget the search may use (all of it without finalists)."""
    if space.time_budget_s is None:
        return None
    return space.time_budget_s * (SEARCH_SHARE if space.finalists else 1.0)


def pick(trials: list, k: int) -> list:
    """The top ``k`` scored trials of a ranked list (errors and never-scored trials are not finalists)."""
    return [t for t in trials if t.best_epoch is not None and t.status != "error"][:k]


def rank(trials: list, metric: str, mode: str, finalists: int = 0) -> list:
    """Re-checked trials first, by the mean of all their runs; then the rest by their one run, as before.

    ``finalists``: how many of the ranked ``trials`` were picked for the re-check. With seed re-runs, a finalist
    whose re-runs did not count (a time budget stopped them before its best epoch) stays among the finalists
    with the mean of the runs it has, its own: a re-checked trial whose mean fell below it must not win just
    because it was measured more (cross-validation scores are on other rows, so there only the folds rank)."""
    sign = 1 if mode == "max" else -1
    head = [t for t in trials if t.rechecked]
    if not any(t.fold_scores for t in head):
        head += [t for t in pick(trials, finalists) if not t.rechecked]
    chosen = {id(t) for t in head}
    head.sort(key=lambda t: -sign * mean_sd(t.scores(metric))[0])
    return head + [t for t in trials if id(t) not in chosen]


def check_cv(space, config, *, distributed: bool, flag: str = "--finalists-cv") -> None:
    """Before anything starts: refuse cross-validation where it cannot run (``space.finalists_cv`` 0: nothing to
    check). ``config``: the validated job, its ``data.path`` readable here; ``distributed``: its trials need a
    TorchTrainer; ``flag``: how the user asked for it (``--finalists-cv``, or ``finalists_cv`` in the space).

    Raises:
        UserError: naming ``flag``: distributed trials, a job that cannot read the decoded-input cache, or more
            folds than the rows of a class in train+val.
    """
    k = space.finalists_cv
    if not k:
        return
    if distributed:
        s = config.scaling
        raise UserError(f"{flag}: cross-validation folds train as in-process trials (one worker, no GPU), but this "
                        f"job's trials run on a TorchTrainer (scaling.num_workers {s.num_workers}, scaling.use_gpu "
                        f"{str(s.use_gpu).lower()}); set scaling.num_workers=1 and scaling.use_gpu=false, or "
                        f"re-check the finalists with other seeds (leave out {flag})")
    info = read_dataset_info(config.data.path)
    reason = decoded.unusable_reason(config, info)
    if reason is None and decoded.find_entry(config, info) is None:
        reason = decoded.over_budget(config, info)
    if reason is not None:
        raise UserError(f"{flag}: the folds are read from the decoded-input cache (a fold is a row subset of it, "
                        f"never decoded again), which this job cannot use: {reason}")
    check_fold_count(info, k, flag)


def _run_recheck(config: dict[str, Any], *, finalist_params: dict[str, dict[str, Any]], job_raw: dict[str, Any],
                 experiment_dir: str, run_trial: Callable[..., None], folds=None) -> None:
    """One run: a finalist's parameters with another seed, or on one cross-validation fold of ``folds``, trained
    as a sweep trial is (``run_trial``)."""
    params = dict(finalist_params[config["finalist"]])
    if "fold" in config:
        k = int(config["fold"])
        run_trial(params, job_raw=job_raw, experiment_dir=experiment_dir,
                  fold=(k, folds.k, folds.rows(k, held_out=False), folds.rows(k, held_out=True)))
        return
    run_trial({**params, "train.seed": config["train.seed"]}, job_raw=job_raw, experiment_dir=experiment_dir)


def _score(result, metric: str, mode: str) -> tuple[float | None, int]:
    """(best-epoch metric, epochs run) of a run, from what it reported (contrastive pre-training excluded)."""
    try:
        rows = result.metrics_dataframe.to_dict("records")
    except Exception:  # noqa: BLE001 - no result at all
        return None, 0
    rows = [r for r in rows if metric in r and r[metric] == r[metric] and not r.get("train.contrastive_pretraining")]
    if not rows:
        return None, 0
    sign = 1 if mode == "max" else -1
    return max(sign * float(r[metric]) for r in rows) * sign, max(int(r.get("epoch", 0)) for r in rows)


def _cv_ready(setup, chosen: list) -> str | None:
    """Before the folds train: the decoded-input cache entry of every finalist, built once here when missing (a
    sweep whose embedding cache served every epoch decoded nothing). Returns why a fold cannot be read, or None."""
    for t in chosen:
        config = validate_job(apply_overrides(setup.job_raw, t.params.items()))
        plan = decoded.plan(config, read_dataset_info(config.data.path), build=True)
        if not plan.used:
            return plan.reason
    return None


def recheck(setup, trials: list, *, run_trial: Callable[..., None], resources: dict[str, float],
            max_concurrent: int, budget_left: float | None = None) -> None:
    """Run the top ``space.finalists`` of the ranked ``trials`` again: with ``space.finalists_cv`` K, once per
    fold of K-fold cross-validation over train+val, setting each finalist's ``fold_scores``; otherwise with
    ``space.finalist_seeds`` other seeds, setting its ``rechecks``. Needs Ray running (the sweep's).

    ``run_trial``, ``resources`` and ``max_concurrent``: the sweep's own trial function, per-trial resources
    and concurrency (:mod:`mmray.tune.sweep` passes them; this module sits below it)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from mmray.tune.clock import SweepClock  # imports Ray (a Tune stopper)

    space = setup.space
    chosen = pick(trials, space.finalists)
    if len(chosen) < 2:  # one finalist (or none) is the winner already
        return
    config = validate_job(setup.job_raw)
    metric, mode = space.metric, space.resolved_mode
    exp = store.join(setup.experiment_dir, FINALISTS_DIR)
    store.remove(exp)  # a re-check cut short by a killed sweep starts again
    params = {t.trial_id: dict(t.params) for t in chosen}
    folds = None
    if space.finalists_cv:
        why = _cv_ready(setup, chosen)
        if why is not None:  # checked before the sweep started; a disk filled since, say: keep the sweep's result
            print(f"mmray: warning: the finalists were not cross-validated: the folds are read from the "
                  f"decoded-input cache, which is not available ({why}); the winner is the best single run",
                  flush=True)
            return
        folds = make_folds(read_dataset_info(config.data.path), space.finalists_cv, config.train.seed)
        write_folds(setup.experiment_dir, folds)
        grid = {"fold": tune.grid_search(list(range(folds.k)))}
        print(f"mmray: scoring the top {len(chosen)} trials by {folds.k}-fold cross-validation over train+val "
              f"(folds of {', '.join(map(str, folds.sizes()))} rows, stratified by label; "
              f"{len(chosen) * folds.k} runs)", flush=True)
    else:
        seeds = [config.train.seed + i for i in range(1, space.finalist_seeds + 1)]
        grid = {"train.seed": tune.grid_search(seeds)}
        print(f"mmray: checking the top {len(chosen)} trials twice: {len(seeds)} more seed(s) each "
              f"({len(chosen) * len(seeds)} runs)", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(_run_recheck, finalist_params=params, job_raw=setup.job_raw, experiment_dir=exp,
                             run_trial=run_trial, folds=folds),
        resources)
    clock = SweepClock(exp, budget_left, metric, mode)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    results = tune.Tuner(
        trainable,
        param_space={"finalist": tune.grid_search(list(params)), **grid},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=store.split(exp)[1], storage_path=store.split(exp)[0], stop=clock,
                                  callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), clock], verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    ).fit()
    by_id = {t.trial_id: t for t in chosen}
    scored = []
    for r in results:
        score, epochs = _score(r, metric, mode)
        cfg = r.config or {}
        t = by_id.get(cfg.get("finalist"))
        if t is None or score is None:
            continue
        cut = (r.metrics or {}).get("trial_id") in clock.stopped_by_budget
        if r.error is None and (not cut or epochs >= (t.best_epoch or 0)):
            scored.append((t, int(cfg.get("fold", 0)), score))
    for t, _, score in sorted(scored, key=lambda x: x[1]):  # folds in fold order
        (t.fold_scores if folds is not None else t.rechecks).append(score)

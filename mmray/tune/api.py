"""``mmray.tune_job``: a sweep from Python, everything ``mmray tune`` does (the CLI only parses and prints)."""
from __future__ import annotations

import os
from typing import Iterable

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, read_yaml
from mmray.train.api import absolute_paths, check_dataset
from mmray.tune.budget import parse_duration
from mmray.tune.experiment import load_setup, prepare
from mmray.tune.finalists import check_cv
from mmray.tune.results import SweepSummary
from mmray.tune.space import load_space
from mmray.tune.sweep import distributed, run_sweep


def tune_job(
    job: str | os.PathLike | None = None,
    space: str | os.PathLike | None = None,
    *,
    overrides: Iterable[str] = (),
    num_samples: int | None = None,
    time_budget: str | float | None = None,
    finalists: int | None = None,
    finalists_cv: int | None = None,
    ensemble: int | None = None,
    name: str | None = None,
    storage: str | None = None,
    resume: str | None = None,
    report: bool = True,
) -> SweepSummary:
    """Sweep the job at ``job`` over the search space at ``space`` with Ray Tune + Optuna, rank the trials,
    export the best one and write the report; or, with ``resume``, finish a stopped sweep.

    Args:
        job: the job YAML (a path); not with ``resume``.
        space: the search-space YAML (a path); not with ``resume``. None: the built-in default space
            (``mmray/tune/default_space.yaml``) fitted to the job.
        overrides: ``KEY=VALUE`` settings applied to the job, as ``--set`` does.
        num_samples: trials to run (default: the space's ``num_samples``; with ``time_budget``, as many as
            it allows).
        time_budget: the sweep's wall-clock budget, ``"90s"``, ``"20m"``, ``"1.5h"`` or seconds: no trial starts
            after it and unfinished trials are stopped, their checkpoints kept and ranked. With
            ``num_samples``, whichever ends first. With finalists, the search gets three quarters of it.
        finalists: train the top ``finalists`` trials again with other seeds before naming the winner (the
            best mean wins); 0 = off. Default: the space's ``finalists`` (3 in the built-in space).
        finalists_cv: score the finalists by ``finalists_cv``-fold cross-validation over train+val instead
            (folds stratified by label and seeded with ``train.seed``; each fold trains on the others with the
            job's epochs and early stopping and is scored on the held-out one; the best mean over the folds
            wins; the test split is never in a fold); 0 = off. In-process trials only; needs at least 2
            finalists, the decoded-input cache, and at least ``finalists_cv`` rows of every class in train+val.
            ``best/`` is the winner's own best checkpoint. Default: the space's ``finalists_cv`` (0).
        ensemble: also export the top ``ensemble`` trials as one ensemble (probabilities averaged); ``best/``
            is the better of it and the single winner on validation; 0 = off. Default: the space's.
        name: the experiment's name; an existing experiment of that name is an error. Default:
            ``<job name>-sweep``, or the next free ``-2``, ``-3``...
        storage: where experiments go (a folder or a URI); default the job's ``storage``.
        resume: an experiment folder to continue; the job and space are read from it.
        report: write ``report/`` when the sweep ends.

    Returns:
        The :class:`~mmray.tune.results.SweepSummary`: the ranked trials, the best export's folder and
        metrics, the report's path (:func:`~mmray.tune.results.format_summary` prints it).

    Raises:
        UserError: a bad job, space, time budget or dataset, cross-validation that cannot run here, or an
            experiment that exists (nothing started).
    """
    if resume:
        if job or space or time_budget is not None or num_samples is not None or finalists is not None \
                or ensemble is not None or finalists_cv is not None:
            raise UserError("--resume takes only EXPERIMENT_DIR: the job, space and budget are read from it")
        return run_sweep(load_setup(str(resume)), resume=True, report=report)
    if not job:
        raise UserError("give JOB.yaml (and optionally --space SPACE.yaml), or --resume EXPERIMENT_DIR")
    budget = parse_duration(time_budget) if time_budget is not None else None  # a bad one: exit 2 first
    job_raw = apply_overrides(read_yaml(job), overrides, warn=True)
    config = validate_job(job_raw, str(job))  # a bad job is refused before anything starts
    sweep_space = load_space(str(space) if space is not None else None, job_raw, num_samples=num_samples,
                             time_budget=budget, finalists=finalists, ensemble=ensemble, finalists_cv=finalists_cv)
    if sweep_space.finalists_cv:  # what only the job and its dataset can tell, before anything is written
        local = absolute_paths(config)
        check_dataset(local)
        check_cv(sweep_space, local, distributed=distributed(local),
                 flag="--finalists-cv" if finalists_cv is not None else "finalists_cv")
    setup = prepare(job_raw, sweep_space, name=f"{config.name}-sweep" if name is None else name,
                    storage=storage or config.storage, explicit_name=name is not None)
    return run_sweep(setup, report=report)

"""``mmray.tune_job``: a sweep from Python, everything ``mmray tune`` does (the CLI only parses and prints)."""
from __future__ import annotations

import os
from typing import Iterable

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, read_yaml
from mmray.tune.experiment import load_setup, prepare
from mmray.tune.results import SweepSummary
from mmray.tune.space import load_space
from mmray.tune.sweep import run_sweep


def tune_job(
    job: str | os.PathLike | None = None,
    space: str | os.PathLike | None = None,
    *,
    overrides: Iterable[str] = (),
    num_samples: int | None = None,
    name: str | None = None,
    storage: str | None = None,
    resume: str | None = None,
    report: bool = True,
) -> SweepSummary:
    """Sweep the job at ``job`` over the search space at ``space`` with Ray Tune + Optuna, rank the trials,
    export the best one and write the report; or, with ``resume``, finish a stopped sweep.

    Args:
        job: the job YAML (a path); not with ``resume``.
        space: the search-space YAML (a path); not with ``resume``.
        overrides: ``KEY=VALUE`` settings applied to the job, as ``--set`` does.
        num_samples: trials to run (default: the space's ``num_samples``).
        name: the experiment's name; an existing experiment of that name is an error. Default:
            ``<job name>-sweep``, or the next free ``-2``, ``-3``...
        storage: where experiments go (a folder or a URI); default the job's ``storage``.
        resume: an experiment folder to continue; the job and space are read from it.
        report: write ``report/`` when the sweep ends.

    Returns:
        The :class:`~mmray.tune.results.SweepSummary`: the ranked trials, the best export's folder and
        metrics, the report's path (:func:`~mmray.tune.results.format_summary` prints it).

    Raises:
        UserError: a bad job, space or dataset, or an experiment that exists (nothing started).
    """
    if resume:
        if job or space:
            raise UserError("--resume takes only EXPERIMENT_DIR: the job and space are read from it")
        return run_sweep(load_setup(str(resume)), resume=True, report=report)
    if not job or not space:
        raise UserError("give JOB.yaml and --space SPACE.yaml (or --resume EXPERIMENT_DIR)")
    job_raw = apply_overrides(read_yaml(job), overrides, warn=True)
    config = validate_job(job_raw, str(job))  # a bad job is refused before anything starts
    sweep_space = load_space(str(space), job_raw, num_samples=num_samples)
    setup = prepare(job_raw, sweep_space, name=f"{config.name}-sweep" if name is None else name,
                    storage=storage or config.storage, explicit_name=name is not None)
    return run_sweep(setup, report=report)

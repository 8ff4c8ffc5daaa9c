"""``mmray tune``: Ray Tune + Optuna over a job, each trial running the same loop as ``mmray train``.

Layout of ``STORAGE/NAME/`` (the experiment):
    job.yaml, space.yaml       what was swept (``--resume`` reads them back)
    optuna.db                  the Optuna study (``optuna-dashboard sqlite:///.../optuna.db``)
    <trial folders>/           Ray Tune's own: checkpoints, result.json
    trials/<trial_id>/tensorboard/   each trial's scalars and HParams
    leaderboard.csv, best/     written when the sweep ends
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, read_yaml
from mmray.tune.algorithms import SCHEDULERS, SEARCHERS
from mmray.tune.space import SpaceConfig, check_against_job

JOB_FILE, SPACE_FILE, STUDY_FILE = "job.yaml", "space.yaml", "optuna.db"
CPUS_PER_TRIAL = 1.0


def _run_trial(params: dict[str, Any], *, job_raw: dict[str, Any], experiment_dir: str) -> None:
    """One trial: the job with this trial's parameters, trained in-process by the shared loop."""
    import torch
    from ray import tune

    from mmray.train.loop import train_loop
    from mmray.tune.context import TuneTrialContext, trial_dir

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    config = validate_job(apply_overrides(job_raw, params.items()))
    torch.set_num_threads(max(1, int(CPUS_PER_TRIAL)))  # concurrent trials share the cores
    run_dir = trial_dir(experiment_dir, tune.get_context().get_trial_id())
    train_loop(config, TuneTrialContext(config, run_dir))


@dataclass
class SweepSetup:
    experiment_dir: str
    job_raw: dict[str, Any]
    space: SpaceConfig


def prepare(job_raw: dict[str, Any], space: SpaceConfig, *, name: str, storage: str) -> SweepSetup:
    """Validate, make the experiment folder and record what is swept. Nothing runs yet."""
    from mmray.train.api import absolute_paths, check_dataset

    config = absolute_paths(validate_job(job_raw))
    check_dataset(config)
    job_raw = apply_overrides(job_raw, [("data.path", config.data.path)])
    experiment_dir = os.path.join(os.path.abspath(storage), name)
    if os.path.exists(os.path.join(experiment_dir, JOB_FILE)):
        raise UserError(f"experiment {experiment_dir} exists; continue it with `mmray tune --resume {experiment_dir}` "
                        f"or choose another --name")
    os.makedirs(experiment_dir, exist_ok=True)
    with open(os.path.join(experiment_dir, JOB_FILE), "w") as f:
        yaml.safe_dump(job_raw, f, sort_keys=False)
    with open(os.path.join(experiment_dir, SPACE_FILE), "w") as f:
        yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True), f, sort_keys=False)
    return SweepSetup(experiment_dir, job_raw, space)


def load_setup(experiment_dir: str) -> SweepSetup:
    experiment_dir = os.path.abspath(experiment_dir)
    if not os.path.isfile(os.path.join(experiment_dir, JOB_FILE)):
        raise UserError(f"{experiment_dir}: not an mmray experiment (no {JOB_FILE})")
    job_raw = read_yaml(os.path.join(experiment_dir, JOB_FILE))
    space = SpaceConfig.model_validate(read_yaml(os.path.join(experiment_dir, SPACE_FILE)))
    check_against_job(space, job_raw)
    return SweepSetup(experiment_dir, job_raw, space)


def max_epochs(setup: SweepSetup) -> int:
    spec = setup.space.parameters.get("train.epochs")
    if spec is None:
        return validate_job(setup.job_raw).train.epochs
    return int(max(spec.probe_values()))


def concurrency(space: SpaceConfig) -> int:
    """Trials at once: what the cluster's CPUs hold at one CPU per in-process trial, capped by the space."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    fit = max(1, math.floor(cpus / CPUS_PER_TRIAL))
    return min(fit, space.max_concurrent_trials or fit, space.num_samples)


def _tuner(setup: SweepSetup, *, restore: bool):
    from ray import tune
    from ray.tune import CLIReporter
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    space, exp = setup.space, setup.experiment_dir
    config = validate_job(setup.job_raw)
    if config.scaling.num_workers != 1 or config.scaling.use_gpu:
        raise UserError("scaling.num_workers: sweeps currently run each trial as one in-process CPU worker; "
                        "set scaling.num_workers: 1 and scaling.use_gpu: false in the job")
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, job_raw=setup.job_raw, experiment_dir=exp), {"CPU": CPUS_PER_TRIAL})
    if restore:
        return tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = space.metric, space.resolved_mode
    # The searcher's study lives in memory and is snapshotted with Tune's experiment state, so a resumed
    # sweep's searcher agrees with Tune about which trials finished; results.finish() stores the study.
    searcher = OptunaSearch(space=space.sample, metric=metric, mode=mode,
                            sampler=SEARCHERS.entry(space.search.name).builder(space.search),
                            study_name=os.path.basename(exp))
    scheduler = SCHEDULERS.entry(space.scheduler.name).builder(space.scheduler, metric=metric, mode=mode,
                                                               max_t=max_epochs(setup))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=space.num_samples,
                                    max_concurrent_trials=concurrency(space)),
        run_config=tune.RunConfig(
            name=os.path.basename(exp), storage_path=os.path.dirname(exp),
            # Every checkpoint is kept while the sweep runs: pruning by score can delete the one a
            # killed sweep's last snapshot points at, and the trial could not resume. finish() prunes.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            # result.json/progress.csv per trial; no Tune TensorBoard logger: mmray writes its own, per trial
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
            progress_reporter=CLIReporter(
                metric_columns={"epoch": "epoch", metric: metric, "val.loss": "val.loss"},
                parameter_columns={k: k.split(".", 1)[-1] for k, _ in space.ordered_parameters()},
                max_report_frequency=15, sort_by_metric=True, metric=metric, mode=mode),
            verbose=1,
        ),
    )


def run_sweep(setup: SweepSetup, *, resume: bool = False):
    """Run (or continue) the sweep; returns the summary written by :func:`mmray.tune.results.finish`."""
    from mmray.runtime import ensure_ray
    from mmray.tune.results import finish

    # Tune's legacy reporter honours the compact trial table configured in _tuner (the new one prints
    # every trial's full result box); it must be chosen before the Tuner starts.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # per-epoch checkpoints with num_to_keep force frequent state snapshots; expected, not worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ensure_ray()
    results = _tuner(setup, restore=resume).fit()
    return finish(setup, results)

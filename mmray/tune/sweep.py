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
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, parse_yaml
from mmray.tune.algorithms import SCHEDULERS, SEARCHERS
from mmray.tune.space import SpaceConfig, check_against_job

JOB_FILE, SPACE_FILE, STUDY_FILE = "job.yaml", "space.yaml", "optuna.db"
CPUS_PER_TRIAL = 1.0  # an in-process trial: decode and train in one process
DATA_CPUS = 0.5  # kept free per distributed trial for its Ray Data decoding


def _run_trial(params: dict[str, Any], *, job_raw: dict[str, Any], experiment_dir: str,
               context_class: type | None = None) -> None:
    """One trial: the job with this trial's parameters, trained in-process by the shared loop.

    ``context_class`` (default :class:`~mmray.tune.context.TuneTrialContext`) is the in-process trial's
    loop context; ``benchmarks/sweep.py`` passes a subclass that timestamps the first training batch.
    """
    import torch
    from ray import tune

    from mmray.train.loop import train_loop
    from mmray.tune.context import TuneTrialContext, trial_dir

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    config = validate_job(apply_overrides(job_raw, params.items()))
    run_dir = trial_dir(experiment_dir, tune.get_context().get_trial_id())
    if distributed(config):
        # N workers (or GPUs): this function is only a driver; its TorchTrainer run is named after the
        # trial, so a restarted trial continues from that run's checkpoints.
        from ray.tune.integration.ray_train import TuneReportCallback

        from mmray.train.trainer import fit

        outcome = fit(config, run_dir=run_dir, callbacks=[TuneReportCallback()])
        if outcome.error is not None:
            raise outcome.error
        return
    torch.set_num_threads(max(1, int(CPUS_PER_TRIAL)))  # concurrent trials share the cores
    # What the trial before left in this reused process: released here, not as that trial ended, because Tune
    # gives a stopped trial's thread 2 s to end before it refuses to reuse the process for the next trial.
    release_trial_memory()
    train_loop(config, _embedding_cache_context(config, run_dir, context_class or TuneTrialContext))


def release_trial_memory() -> None:
    """Before an in-process trial, in a process an earlier trial used: collect that trial's model, optimizer
    and readers (all locals of its loop, unreachable now) and give freed memory back to the OS: pyarrow's
    pool keeps freed buffers, and glibc keeps freed arenas, unless asked (``malloc_trim``).

    What stays, once per process: torch, the decoders, pyarrow and their caches (about 1.1 GB RSS on CPU).
    Measured on 15 tiny trials in one process: RSS grew 11 MB with this, 37 MB without."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): its allocator returns memory its own way


def _embedding_cache_context(config, run_dir: str, context_class: type):
    """The in-process trial's context, reading the sweep's embedding cache when it serves this trial."""
    from mmray.data.cache import cached_readers, plan
    from mmray.data.dataset_dir import read_dataset_info

    cache = plan(config, read_dataset_info(config.data.path), build=False)  # never built here: the sweep did
    print(f"mmray {cache.line()}", flush=True)
    if not cache.used:
        return context_class(config, run_dir)
    ctx = context_class(config, run_dir, readers=cached_readers(config, cache))
    ctx.cached_encoders = cache.weights
    return ctx


def _build_embedding_cache(setup: "SweepSetup") -> None:
    """Before any trial: build the embedding cache all trials share (or say why there is none)."""
    from mmray.data.cache import shared_plan
    from mmray.data.dataset_dir import read_dataset_info

    config = validate_job(setup.job_raw)
    swept = {k: spec.probe_values() for k, spec in setup.space.parameters.items()}
    print(f"mmray sweep {shared_plan(config, read_dataset_info(config.data.path), swept).line()}", flush=True)


def distributed(config) -> bool:
    """Whether trials need a TorchTrainer (several workers or a GPU) rather than the in-process loop."""
    return config.scaling.num_workers > 1 or config.scaling.use_gpu


def trial_resources(config) -> dict[str, float]:
    """What one trial reserves. A distributed trial's driver takes almost nothing (its workers reserve their
    own CPUs/GPUs); taking a whole CPU there would starve its own trainer on a small cluster."""
    if distributed(config):
        return {"CPU": 0.01}
    return {"CPU": CPUS_PER_TRIAL}


def trial_footprint(config) -> dict[str, float]:
    """Everything one running trial occupies: driver, workers, and room for Ray Data to decode."""
    if not distributed(config):
        return {"CPU": CPUS_PER_TRIAL}
    s = config.scaling
    cpus = s.num_workers * s.cpus_per_worker + DATA_CPUS
    return {"CPU": cpus, **({"GPU": s.num_workers * s.gpus_per_worker} if s.use_gpu else {})}


@dataclass
class SweepSetup:
    experiment_dir: str
    job_raw: dict[str, Any]
    space: SpaceConfig


def prepare(job_raw: dict[str, Any], space: SpaceConfig, *, name: str, storage: str,
            explicit_name: bool = True) -> SweepSetup:
    """Validate, make the experiment folder and record what is swept. Nothing runs yet.

    An existing experiment is never reused: with ``explicit_name`` that is an error (continue it with
    ``--resume``), otherwise the next free ``NAME-2``, ``NAME-3``... is used.
    """
    from mmray.config.schema import check_run_name
    from mmray.train.api import absolute_paths, check_dataset, check_model_files

    check_run_name(name, "--name" if explicit_name else "name")
    config = absolute_paths(validate_job(job_raw))
    check_dataset(config)
    check_model_files(config)
    job_raw = apply_overrides(job_raw, [("data.path", config.data.path)])
    store.check_writable(storage)  # before Ray starts
    root = store.normalize(storage)
    experiment_dir, n = store.join(root, name), 1
    while not explicit_name and store.exists(store.join(experiment_dir, JOB_FILE)):
        n += 1
        experiment_dir = store.join(root, f"{name}-{n}")
    if store.exists(store.join(experiment_dir, JOB_FILE)):
        with store.folder_lock(experiment_dir, what="experiment"):  # in use: that message, naming the holder
            pass
        raise UserError(f"experiment {experiment_dir} exists; continue it with `mmray tune --resume {experiment_dir}` "
                        f"or choose another --name")
    store.makedirs(experiment_dir)
    store.write_text(store.join(experiment_dir, JOB_FILE), yaml.safe_dump(job_raw, sort_keys=False))
    space_doc = space.model_dump(mode="json", by_alias=True, exclude_none=True)
    store.write_text(store.join(experiment_dir, SPACE_FILE), yaml.safe_dump(space_doc, sort_keys=False))
    return SweepSetup(experiment_dir, job_raw, space)


def load_setup(experiment_dir: str) -> SweepSetup:
    experiment_dir = store.normalize(experiment_dir)
    if not store.is_file(store.join(experiment_dir, JOB_FILE)):
        raise UserError(f"{experiment_dir}: not an mmray experiment (no {JOB_FILE})")
    job_file, space_file = store.join(experiment_dir, JOB_FILE), store.join(experiment_dir, SPACE_FILE)
    job_raw = parse_yaml(store.read_text(job_file), job_file)
    space = SpaceConfig.model_validate(parse_yaml(store.read_text(space_file), space_file))
    check_against_job(space, job_raw)
    return SweepSetup(experiment_dir, job_raw, space)


def max_epochs(setup: SweepSetup) -> int:
    spec = setup.space.parameters.get("train.epochs")
    if spec is None:
        return validate_job(setup.job_raw).train.epochs
    return int(max(spec.probe_values()))


def concurrency(space: SpaceConfig, config) -> int:
    """Trials at once: as many as the cluster's CPUs/GPUs hold (see :func:`trial_footprint`), capped by the space."""
    import ray

    cluster = ray.cluster_resources()
    fit = min(math.floor(cluster.get(k, 0.0) / v) for k, v in trial_footprint(config).items() if v > 0)
    fit = max(1, fit)
    return min(fit, space.max_concurrent_trials or fit, space.num_samples)


def _tuner(setup: SweepSetup, *, restore: bool):
    from ray import tune
    from ray.tune import CLIReporter
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    space, exp = setup.space, setup.experiment_dir
    config = validate_job(setup.job_raw)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, job_raw=setup.job_raw, experiment_dir=exp), trial_resources(config))
    if restore:
        return tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = space.metric, space.resolved_mode
    baseline = space.baseline_point(setup.job_raw) if space.baseline else None
    # The searcher's study lives in memory and is snapshotted with Tune's experiment state, so a resumed
    # sweep's searcher agrees with Tune about which trials finished; results.finish() stores the study.
    searcher = OptunaSearch(space=space.sample, metric=metric, mode=mode,
                            sampler=SEARCHERS.entry(space.search.name).builder(space.search),
                            study_name=store.split(exp)[1],
                            # the baseline is the first trial the searcher hands out (an enqueued Optuna trial)
                            points_to_evaluate=[baseline] if baseline else None)
    scheduler = SCHEDULERS.entry(space.scheduler.name).builder(space.scheduler, metric=metric, mode=mode,
                                                               max_t=max_epochs(setup), baseline=baseline)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=space.num_samples,
                                    max_concurrent_trials=concurrency(space, config),
                                    # An in-process trial's next trial runs in the same process: torch, its
                                    # compiler stack (imported by the first optimizer) and the decoders are
                                    # imported once per slot, not once per trial (~1 s to the first step
                                    # instead of tens of seconds on a busy 2-core box; benchmarks/sweep.py).
                                    reuse_actors=not distributed(config)),
        run_config=tune.RunConfig(
            name=store.split(exp)[1], storage_path=store.split(exp)[0],  # a folder or a URI
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


def run_sweep(setup: SweepSetup, *, resume: bool = False, report: bool = True):
    """Run (or continue) the sweep, then write its results and (``report``) its report.

    Returns the summary written by :func:`mmray.tune.results.finish`, with ``report_path`` set when the
    report was written. Steps, in order: start Ray; prepare what the trials share (nothing yet); run the
    trials; rank them and export the best; write ``report/``.
    """
    from mmray.runtime import ensure_ray
    from mmray.tune.results import finish

    # Tune's legacy reporter honours the compact trial table configured in _tuner (the new one prints
    # every trial's full result box); it must be chosen before the Tuner starts.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # per-epoch checkpoints with num_to_keep force frequent state snapshots; expected, not worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # One sweep per experiment folder (a second one, or a --resume while it runs, is refused: exit 2).
    with store.folder_lock(setup.experiment_dir, what="experiment"):
        ensure_ray()
        _build_embedding_cache(setup)  # what every trial shares is prepared here, once, before the first trial
        results = _tuner(setup, restore=resume).fit()
        summary = finish(setup, results)
        if report:
            summary.report_path, summary.report_verdicts = write_report_safely(setup.experiment_dir)
    return summary


def write_report_safely(experiment_dir: str) -> tuple[str | None, str]:
    """``mmray report`` for a sweep that just finished. A failure here never fails the sweep (its results are
    already written): it is printed as a warning naming the command that retries it."""
    try:
        from mmray.tune.report import build_report, format_verdicts

        rep = build_report(experiment_dir)
        return rep.published_summary, format_verdicts(rep)
    except Exception as e:  # noqa: BLE001 - the report is a convenience on top of finished results
        print(f"mmray: warning: the sweep finished but its report was not written ({type(e).__name__}: {e}); "
              f"write it with `mmray report {experiment_dir}`", file=sys.stderr)
        return None, ""

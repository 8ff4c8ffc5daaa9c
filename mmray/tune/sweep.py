"""``mmray tune``: Ray Tune + Optuna over a job, each trial running the same loop as ``mmray train``.

The experiment folder it fills (``STORAGE/NAME/``) is described, named and read by :mod:`mmray.tune.experiment`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
from typing import Any

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.loader import apply_overrides
from mmray.data.cache import cached_readers, plan, shared_plan
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decoded import decoded_readers, fold_readers
from mmray.data.decoded import plan as decode_plan
from mmray.data.decoded import shared_plan as shared_decode_plan
from mmray.runtime import ensure_ray
from mmray.train.context import LoopInputs
from mmray.train.loop import train_loop
from mmray.train.trainer import fit
from mmray.tune.algorithms import SCHEDULERS, SEARCHERS
from mmray.tune.budget import read_ledger
from mmray.tune.context import TuneTrialContext
from mmray.tune.experiment import SweepSetup, read_cores, trial_dir
from mmray.tune.finalists import recheck, search_budget
from mmray.tune.report import build_report, format_verdicts
from mmray.tune.results import finish
from mmray.tune.space import SpaceConfig

CPUS_PER_TRIAL = 1.0  # an in-process trial: decode and train in one process
DATA_CPUS = 0.5  # kept free per distributed trial for its Ray Data decoding


def _run_trial(params: dict[str, Any], *, job_raw: dict[str, Any], experiment_dir: str,
               context_class: type | None = None, cores_key: str | None = None, fold: tuple | None = None,
               shared: dict[str, bool] | None = None) -> None:
    """One trial: the job with this trial's parameters, trained in-process by the shared loop.

    ``context_class`` (default :class:`~mmray.tune.context.TuneTrialContext`) is the in-process trial's
    loop context; ``benchmarks/sweep.py`` passes a subclass that timestamps the first training batch.
    ``cores_key`` is where the sweep publishes each trial's CPU share (:mod:`mmray.tune.cores`).
    ``fold``: ``(k, K, training rows, held-out rows)``, a finalist's cross-validation run
    (:mod:`mmray.tune.finalists`): it trains on the training rows of train+val and validates on the held-out
    ones, both read from the decoded-input cache (the embedding cache is not used: it holds whole splits).
    ``shared``: which caches the sweep said its trials read (:func:`_build_shared_caches`); the trial says
    nothing about its inputs unless it cannot read one of them (:func:`trial_input_notes`).
    """
    import torch
    from ray import tune

    from mmray.tune.cores import ShareFollower  # imports Ray (a Tune callback / Ray's key-value store)

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    config = validate_job(apply_overrides(job_raw, params.items()))
    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_dir(experiment_dir, trial_id)
    # The trial's plans, made once: never built here (the sweep built what trials share before the first one).
    info = read_dataset_info(config.data.path)
    cache = plan(config, info, build=False)
    # a fold reads only the decoded-input cache (built before the folds started)
    decoded = decode_plan(config, info, build=False, embedding=cache if fold is None else None)
    for line in trial_input_notes(shared, *([cache] if fold is None else []), decoded):
        print(f"mmray trial {trial_id}: {line}", flush=True)
    if distributed(config):
        # N workers (or GPUs): this function is only a driver; its TorchTrainer run is named after the
        # trial, so a restarted trial continues from that run's checkpoints.
        from ray.tune.integration.ray_train import TuneReportCallback

        outcome = fit(config, run_dir=run_dir, callbacks=[TuneReportCallback()], cache=cache, decoded=decoded,
                      announce=False)
        if outcome.error is not None:
            raise outcome.error
        return
    torch.set_num_threads(max(1, int(CPUS_PER_TRIAL)))  # concurrent trials share the cores
    # What the trial before left in this reused process: released here, not as that trial ended, because Tune
    # gives a stopped trial's thread 2 s to end before it refuses to reuse the process for the next trial.
    release_trial_memory()
    if fold is not None:
        k, n, train_rows, held_out = fold
        print(f"mmray fold {k + 1} of {n}: training on {sum(map(len, train_rows.values())):,} rows of train+val, "
              f"validating on the {sum(map(len, held_out.values())):,} held out", flush=True)
        ctx = (context_class or TuneTrialContext)(config, run_dir, readers=fold_readers(config, decoded, train_rows,
                                                                                         held_out))
        train_loop(config, ctx, LoopInputs())
        return
    readers = decoded_readers(config, decoded)  # the decoded-input cache's, or the shards'
    ctx = (context_class or TuneTrialContext)(config, run_dir,
                                              readers=cached_readers(config, cache, raw=readers) if cache.used else readers,
                                              # more threads once fewer trials remain than cores
                                              cores=ShareFollower(cores_key, tune.get_context().get_trial_id()))
    train_loop(config, ctx, LoopInputs.from_cache(cache))


def trial_input_notes(shared: dict[str, bool] | None, *plans) -> list[str]:
    """What a trial says about its input plans (an embedding-cache and a decoded-input-cache plan): nothing when
    it reads what the sweep said its trials read (the sweep said it once, before the first trial); the plan's line
    for each cache the sweep shares (``shared[<its line's name>]`` true) but this trial cannot read."""
    unread = [p.line() for p in plans if not p.used]  # "embedding cache: not used: ...", "decoded-input cache: ..."
    return [line for line in unread if (shared or {}).get(line.split(":", 1)[0])]


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


def _build_shared_caches(setup: "SweepSetup") -> dict[str, bool]:
    """Before any trial: build the embedding and decoded-input caches all trials share, and say once, for the
    whole sweep, whether each is used and why not (the trials stay quiet about it: :func:`trial_input_notes`).
    Returns ``{"embedding cache": used, "decoded-input cache": used}``."""
    config = validate_job(setup.job_raw)
    info = read_dataset_info(config.data.path)
    swept = {k: spec.probe_values() for k, spec in setup.space.parameters.items()}
    cache = shared_plan(config, info, swept)
    print(f"mmray sweep {cache.line()}", flush=True)
    decoded = shared_decode_plan(config, info, swept, embedding=cache)
    print(f"mmray sweep {decoded.line()}", flush=True)
    return {p.line().split(":", 1)[0]: p.used for p in (cache, decoded)}


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
    return min(fit, space.max_concurrent_trials or fit, space.num_samples or fit)


def _core_balancer(setup: SweepSetup):
    """In-process trials share the cores no waiting trial needs (:mod:`mmray.tune.cores`). The shares' key is
    named after the experiment, so a resumed sweep's trials read it under the same name."""
    import hashlib

    import ray

    from mmray.tune.cores import CoreBalancer  # imports Ray (a Tune callback / Ray's key-value store)

    key = "cores-" + hashlib.sha1(setup.experiment_dir.encode()).hexdigest()[:12]
    # with a time budget (num_samples None) the searcher always has another trial waiting
    return CoreBalancer(cpus=int(ray.cluster_resources().get("CPU", 1)), total_trials=setup.space.num_samples or 10**6,
                        key=key, experiment_dir=setup.experiment_dir)


def _display(setup: SweepSetup):
    """The live sweep display (:mod:`mmray.tune.display`) for this sweep's metric and swept parameters."""
    from mmray.tune.display import SweepDisplay, SweepProgress  # imports Ray (a Tune callback / Ray's key-value store)

    space, job_raw = setup.space, setup.job_raw
    progress = SweepProgress(metric=space.metric, mode=space.resolved_mode, total=space.num_samples,
                             parameters=[k for k, _ in space.ordered_parameters()], scheduler=space.scheduler.name,
                             budget_s=search_budget(space), spent_s=read_ledger(setup.experiment_dir).elapsed_s or 0.0)
    return SweepDisplay(progress, epochs_of=lambda params: validate_job(
        apply_overrides(job_raw, (params or {}).items())).train.epochs)


def _tuner(setup: SweepSetup, *, restore: bool, shared: dict[str, bool] | None = None):
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from mmray.tune.clock import SweepClock  # imports Ray (a Tune stopper)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" among the trials
    space, exp = setup.space, setup.experiment_dir
    config = validate_job(setup.job_raw)
    balancer = None if distributed(config) else _core_balancer(setup)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, job_raw=setup.job_raw, experiment_dir=exp,
                             cores_key=balancer.key if balancer else None, shared=shared), trial_resources(config))
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
    # the time budget (if any) and the ledger of how the sweep's time was spent (budget.json)
    clock = SweepClock(exp, search_budget(space), metric, mode)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=space.num_samples or -1,  # -1: until the budget stops it
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
            stop=clock,
            # result.json/progress.csv per trial; no Tune TensorBoard logger: mmray writes its own, per trial
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), _display(setup), *([balancer] if balancer else []),
                       clock],
            verbose=0,  # Tune's own trial tables off: the display above is the sweep's progress output
        ),
    )


def run_sweep(setup: SweepSetup, *, resume: bool = False, report: bool = True):
    """Run (or continue) the sweep, then write its results and (``report``) its report.

    Returns the summary written by :func:`mmray.tune.results.finish`, with ``report_path`` set when the
    report was written. Steps, in order: start Ray; prepare what the trials share (nothing yet); run the
    trials; rank them and export the best; write ``report/``.
    """
    from mmray.tune.display import close_displays  # imports Ray (a Tune callback / Ray's key-value store)

    # Tune's legacy output engine at verbose=0 prints no progress of its own: mmray.tune.display is the sweep's
    # progress output. The engine is chosen from this variable when the Tuner starts.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # per-epoch checkpoints with num_to_keep force frequent state snapshots; expected, not worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # One sweep per experiment folder (a second one, or a --resume while it runs, is refused: exit 2).
    with store.folder_lock(setup.experiment_dir, what="experiment"):
        ensure_ray()
        shared = _build_shared_caches(setup)  # what every trial shares is prepared here, once, before the first trial
        try:
            results = _tuner(setup, restore=resume, shared=shared).fit()
        finally:
            close_displays()  # a sweep that raised or was interrupted gives the terminal back
        summary = finish(setup, results, recheck=_recheck(setup, shared) if setup.space.finalists else None)
        summary.cores = read_cores(setup.experiment_dir)
        if report:
            summary.report_path, summary.report_verdicts = write_report_safely(setup.experiment_dir)
    return summary


def _recheck(setup: SweepSetup, shared: dict[str, bool] | None = None):
    """The finalists' re-check (:mod:`mmray.tune.finalists`), given what the search left of the time budget."""

    def run(trials) -> None:
        budget, used = setup.space.time_budget_s, read_ledger(setup.experiment_dir).elapsed_s
        left = None if budget is None else max(budget - (used or 0.0), 1.0)
        config = validate_job(setup.job_raw)
        recheck(setup, trials, run_trial=functools.partial(_run_trial, shared=shared), resources=trial_resources(config),
                max_concurrent=concurrency(setup.space, config), budget_left=left)
    return run


def write_report_safely(experiment_dir: str) -> tuple[str | None, str]:
    """``mmray report`` for a sweep that just finished. A failure here never fails the sweep (its results are
    already written): it is printed as a warning naming the command that retries it."""
    try:
        rep = build_report(experiment_dir)
        return rep.published_summary, format_verdicts(rep)
    except Exception as e:  # noqa: BLE001 - the report is a convenience on top of finished results
        print(f"mmray: warning: the sweep finished but its report was not written ({type(e).__name__}: {e}); "
              f"write it with `mmray report {experiment_dir}`", file=sys.stderr)
        return None, ""

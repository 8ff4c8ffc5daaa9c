"""Sweep benchmark: mmray's per-trial overhead and how fast its TPE + ASHA sweep reaches a target accuracy.

    python benchmarks/sweep.py                      # ~10 minutes on 2 cores
    python benchmarks/sweep.py --rows 800 --epochs 4 --samples 6 --overhead-trials 3   # smaller, faster

(a) Per-trial overhead: Tune runs ``--overhead-trials`` trials one after another, first a bare Ray Tune
    function trial that does nothing but report, then mmray's in-process trial (the real
    ``mmray.tune.sweep._run_trial`` on a tiny job). Measured: from the moment the trial can start (``fit()``
    for the first trial, the previous trial's end for the others) to the trial's entry (bare) or to its
    first training batch (mmray). Printed per phase, so the ratio says where the time goes.
(b) Time to a target validation accuracy, same trial budget (``--samples`` trials of ``--epochs`` epochs):
    mmray TPE + ASHA, mmray random search + no early stopping, and a plain single-process PyTorch + Optuna
    loop (TPE, no Ray: ``optuna.study.optimize`` around mmray's own loop on the same Parquet shards, all
    cores to torch), each from its start to the first epoch whose ``val.accuracy`` >= ``--target``.

Everything runs in one process against one local Ray started once (its start-up is reported, not charged to
either side). The box may be shared: numbers are noisy, ratios within a run are the comparison.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import quickstart_model  # noqa: E402

from mmray.config import validate_job  # noqa: E402
from mmray.tune.context import TuneTrialContext  # noqa: E402

PARAMETERS = {  # a space where the learning rate matters and some fusions learn slower than others
    "model.fusion.name": {"choice": ["concat", "gated", "late", "low_rank_tensor", "attention"]},
    "train.optimizer.lr": {"loguniform": [3.0e-4, 3.0e-2]},
}


def job(data: str, *, name: str, epochs: int, batch_size: int = 32) -> dict[str, Any]:
    return validate_job({
        "name": name, "data": {"path": data, "modalities": ["audio", "image", "text"]}, "model": quickstart_model(),
        "train": {"epochs": epochs, "batch_size": batch_size, "optimizer": {"lr": 3e-3},
                  "early_stopping": {"patience": None}},
        "scaling": {"num_workers": 1},
    }).model_dump(mode="json")


# ----------------------------------------------------------------------------- (a) per-trial overhead
def _stamp(path: str, **marks: float) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(marks) + "\n")


class TimedContext(TuneTrialContext):
    """mmray's in-process trial context, timestamping its construction and the first training batch."""

    marks_file = ""

    def __init__(self, config, run_dir, **kwargs):
        self._t_init = time.time()
        super().__init__(config, run_dir, **kwargs)
        self._first = True

    def prepare_model(self, model):
        _stamp(self.marks_file, model=time.time())
        return super().prepare_model(model)

    def train_batches(self, epoch):
        for batch in super().train_batches(epoch):
            if self._first:
                self._first = False
                _stamp(self.marks_file, context=self._t_init, first_step=time.time(), pid=os.getpid())
            yield batch


def bare_trial(config: dict[str, Any], *, marks: str) -> None:
    from ray import tune

    _stamp(marks, entry=time.time(), pid=os.getpid())
    tune.report({"done": 1})


def mmray_trial(params: dict[str, Any], *, marks: str, job_raw: dict[str, Any], experiment_dir: str) -> None:
    t = time.time()
    import torch  # noqa: F401  (timed on its own: the trial process imports torch and mmray's model code)

    from mmray.tune import sweep

    _stamp(marks, entry=t, imported=time.time())
    context = type("Timed", (TimedContext,), {"marks_file": marks})
    sweep._run_trial(params, job_raw=job_raw, experiment_dir=experiment_dir, context_class=context)
    _stamp(marks, end=time.time())


def overhead_runs(trainable, *, n: int, storage: str, name: str, reuse: bool) -> list[dict[str, float]]:
    """Run ``n`` trials one at a time; returns one dict of timestamps per trial (plus ``fit`` on the first)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    marks = os.path.join(storage, f"{name}.jsonl")
    trainable = tune.with_resources(tune.with_parameters(trainable, marks=marks), {"CPU": 1})
    tuner = tune.Tuner(trainable, param_space={"i": tune.grid_search(list(range(n)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
                       run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                                 callbacks=[JsonLoggerCallback()]))
    fit = time.time()
    tuner.fit()
    rows: list[dict[str, float]] = []
    for line in open(marks):
        m = json.loads(line)
        if "entry" in m:
            rows.append({})
        rows[-1].update(m)
    rows[0]["fit"] = fit
    return rows


def startup_seconds(rows: list[dict[str, float]], until: str) -> list[float]:
    """Per trial: from when it could start (fit, or the previous trial's end) to the ``until`` mark."""
    out = []
    for i, r in enumerate(rows):
        # a bare trial's function is cut off once it has reported: its last mark is its entry
        start = r["fit"] if i == 0 else rows[i - 1].get("end", rows[i - 1]["entry"])
        out.append(r[until] - start)
    return out


def measure_overhead(data: str, storage: str, n: int) -> dict[str, Any]:
    from mmray.tune.experiment import JOB_FILE

    exp = os.path.join(storage, "mmray-overhead")
    os.makedirs(exp, exist_ok=True)
    job_raw = job(data, name="overhead", epochs=1)
    with open(os.path.join(exp, JOB_FILE), "w") as f:
        yaml.safe_dump(job_raw, f)

    def mm(params, *, marks):
        params = {"train.optimizer.lr": 3e-3}  # the grid index is not a job key
        mmray_trial(params, marks=marks, job_raw=job_raw, experiment_dir=exp)

    out: dict[str, Any] = {}
    for reuse in (False, True):
        bare = overhead_runs(bare_trial, n=n, storage=storage, name=f"bare-reuse{int(reuse)}", reuse=reuse)
        mine = overhead_runs(mm, n=n, storage=storage, name=f"mmray-reuse{int(reuse)}", reuse=reuse)
        phases = {
            "to trial entry": startup_seconds(mine, "entry"),
            "to torch imported": startup_seconds(mine, "imported"),
            "to context built (job validated)": startup_seconds(mine, "context"),
            "to model built (tokenizer, encoders, fusion)": startup_seconds(mine, "model"),
            "to first training batch": startup_seconds(mine, "first_step"),
        }
        out[f"reuse_actors={reuse}"] = {"bare": startup_seconds(bare, "entry"), "mmray": phases}
    return out


# ----------------------------------------------------------------------------- (a4) the cold trial, warmed
# What was tried for the cold trial and not shipped (RESULTS.md, "(a4) The cold trial, third try"): the trials in
# Ray's idle workers, which import these as they start (Ray's preload_python_modules).
TRIAL_MODULES = ("torch", "torch._dynamo", "mmray.tune.sweep", "mmray.tune.cores", "mmray.tune.context",
                 "mmray.data.decoded")


@contextlib.contextmanager
def trials_in_idle_workers():
    """Tune gives its trainable actors a runtime env of their own (``PL_DISABLE_FORK``, PyTorch Lightning's), and Ray
    gives an actor only an idle worker of the same runtime env: without it, trial actors take Ray's idle workers
    (assuming none of the variables Tune copies from the driver, e.g. AWS credentials, is set)."""
    from ray.tune.execution import class_cache

    value = class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    try:
        yield
    finally:
        if value is not None:
            class_cache.DEFAULT_ENV_VARS["PL_DISABLE_FORK"] = value


def fresh_ray(preload: tuple[str, ...] = ()) -> float:
    """A new local Ray (its idle worker processes not yet used), its workers importing ``preload`` as they start;
    returns its start-up seconds."""
    import logging

    import ray

    from mmray.runtime import ensure_ray, quiet_ray_logs

    if ray.is_initialized():
        ray.shutdown()
    t = time.time()
    if preload:
        quiet_ray_logs()
        ray.init(address="local", num_cpus=os.cpu_count(), logging_level=logging.WARNING,
                 _system_config={"worker_niceness": 0, "preload_python_modules": list(preload)})
    else:
        ensure_ray()
    return time.time() - t


def idle_workers() -> set[int]:
    """The pids of this driver's Ray's idle worker processes (``ray::IDLE``)."""
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::IDLE")}


def build_decoded(data: str) -> str:
    """The dataset's decoded-input cache, built here once (a sweep would build it before its first trial)."""
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.decoded import plan

    config = validate_job(job(data, name="cache", epochs=1))
    return plan(config, read_dataset_info(data), build=True, runner="local").line()


def measure_cold(data: str, storage: str, n: int, planning_s: float) -> dict[str, Any]:
    """The first (cold) trial of a slot on a fresh Ray, as ``mmray tune`` runs it (reused actors): a bare Tune trial,
    mmray's trial as before (Tune's trial actors in a process of their own), and mmray's trial in a preloaded idle
    worker (:func:`trials_in_idle_workers`, :data:`TRIAL_MODULES`), with fit() ``planning_s`` after Ray started (a driver that plans that long)
    and at once. Per side: seconds from fit() to the first trial's entry (bare) or first step, and whether its
    process was one of Ray's idle workers."""
    from mmray.tune.experiment import JOB_FILE

    exp = os.path.join(storage, "mmray-cold")
    os.makedirs(exp, exist_ok=True)
    job_raw = job(data, name="cold", epochs=1)
    with open(os.path.join(exp, JOB_FILE), "w") as f:
        yaml.safe_dump(job_raw, f)

    def mm(params, *, marks):
        mmray_trial({"train.optimizer.lr": 3e-3}, marks=marks, job_raw=job_raw, experiment_dir=exp)

    out: dict[str, Any] = {}
    for side, trainable, warm, wait in (
            ("bare Tune trial", bare_trial, False, planning_s),
            ("mmray, own process", mm, False, planning_s),
            (f"mmray, idle worker, fit {planning_s:.0f}s after Ray", mm, True, planning_s),
            ("mmray, idle worker, fit at once", mm, True, 0.0)):
        with trials_in_idle_workers() if warm else contextlib.nullcontext():
            fresh_ray(TRIAL_MODULES if warm else ())
            time.sleep(wait)  # stands for the driver's planning
            idle = idle_workers()
            rows = overhead_runs(trainable, n=n, storage=storage, name=f"cold-{len(out)}", reuse=True)
        until = "entry" if trainable is bare_trial else "first_step"
        out[side] = {"to_first_step": startup_seconds(rows, until), "idle_worker": rows[0].get("pid") in idle,
                     "preloaded": warm}
    return out


def measure_tune_start(data: str, storage: str, warm: bool) -> dict[str, Any]:
    """``mmray tune`` as a user runs it (2 trials of 1 epoch on a fresh Ray, the decoded-input cache already built):
    seconds from the sweep's start (before the experiment is prepared) to each slot's first training step, with and
    without the trials taking Ray's preloaded idle workers."""
    import ray

    from mmray.tune import sweep
    from mmray.tune.experiment import prepare
    from mmray.tune.space import SpaceConfig, check_against_job

    if ray.is_initialized():
        ray.shutdown()  # run_sweep starts its own Ray, as `mmray tune` does
    name = f"start-{'warm' if warm else 'cold'}"
    marks = os.path.join(storage, f"{name}.jsonl")
    original_trial, original_ray = sweep._run_trial, sweep.ensure_ray

    def timed_trial(params, **kwargs):
        from mmray.tune import sweep as trial_module

        trial_module._run_trial(params, context_class=type("Timed", (TimedContext,), {"marks_file": marks}), **kwargs)

    sweep._run_trial = timed_trial
    if warm:
        sweep.ensure_ray = lambda: fresh_ray(TRIAL_MODULES)
    try:
        job_raw = job(data, name=name, epochs=1)
        space = SpaceConfig.model_validate({"metric": "val.accuracy", "num_samples": 2, "finalists": 0, "ensemble": 0,
                                            "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
                                            "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 3e-3]}}})
        check_against_job(space, job_raw)
        t0 = time.time()
        setup = prepare(job_raw, space, name=name, storage=storage)
        with trials_in_idle_workers() if warm else contextlib.nullcontext():
            sweep.run_sweep(setup, report=False)
    finally:
        sweep._run_trial, sweep.ensure_ray = original_trial, original_ray
    steps = [m for m in map(json.loads, open(marks)) if "first_step" in m]
    return {"to_first_step": sorted(m["first_step"] - t0 for m in steps)}


# ----------------------------------------------------------------------------- (b) time to target
def first_hit(curves: list[list[tuple[float, float]]], target: float) -> float | None:
    """Seconds from the start to the first (time, accuracy) point >= target, over all trials."""
    hits = [t for curve in curves for t, acc in curve if acc >= target]
    return min(hits) if hits else None


def tensorboard_curves(exp: str, t0: float) -> list[list[tuple[float, float]]]:
    """Each trial's (seconds since t0, val accuracy) per epoch, read back from the TensorBoard files mmray wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = []
    for tb in sorted(glob.glob(os.path.join(exp, "trials", "*", "tensorboard"))):
        acc = EventAccumulator(tb)
        acc.Reload()
        if "val/accuracy" in acc.Tags()["scalars"]:
            curves.append([(e.wall_time - t0, e.value) for e in acc.Scalars("val/accuracy")])
    return curves


def mmray_sweep(data: str, storage: str, *, name: str, epochs: int, samples: int, search: str,
                scheduler: str) -> dict[str, Any]:
    from mmray.tune.experiment import prepare
    from mmray.tune.space import SpaceConfig, check_against_job
    from mmray.tune.sweep import run_sweep

    job_raw = job(data, name=name, epochs=epochs)
    space = SpaceConfig.model_validate({
        "metric": "val.accuracy", "num_samples": samples,
        "search": {"name": search, "seed": 0, "n_startup_trials": max(2, samples // 3)},
        "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
        "parameters": PARAMETERS})
    check_against_job(space, job_raw)
    setup = prepare(job_raw, space, name=name, storage=storage)
    t0 = time.time()
    summary = run_sweep(setup, report=False)
    total = time.time() - t0
    curves = tensorboard_curves(setup.experiment_dir, t0)
    return {"total_s": total, "curves": curves, "epochs": sum(len(c) for c in curves),
            "best": max((a for c in curves for _, a in c), default=0.0),
            "stopped": sum(t.status == "stopped" for t in summary.trials)}


def plain_optuna(data: str, storage: str, *, epochs: int, samples: int) -> dict[str, Any]:
    """What a user writes by hand: optuna.study.optimize around the training loop, one process, no Ray."""
    import optuna
    import torch

    from mmray.config.loader import apply_overrides
    from mmray.train.local import train_local

    torch.set_num_threads(os.cpu_count() or 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    job_raw = job(data, name="plain", epochs=epochs)
    curves: list[list[tuple[float, float]]] = []
    t0 = time.time()

    def objective(trial: optuna.Trial) -> float:
        params = {"model.fusion.name": trial.suggest_categorical("model.fusion.name",
                                                                 PARAMETERS["model.fusion.name"]["choice"]),
                  "train.optimizer.lr": trial.suggest_float("train.optimizer.lr",
                                                            *PARAMETERS["train.optimizer.lr"]["loguniform"], log=True)}
        config = validate_job(apply_overrides(job_raw, params.items()))
        curve: list[tuple[float, float]] = []
        curves.append(curve)

        def on_event(e):
            if e["type"] == "epoch_end":
                curve.append((time.time() - t0, e["metrics"]["val.accuracy"]))

        state, _ = train_local(config, os.path.join(storage, "plain", str(trial.number)), on_event=on_event)
        return state.best_value

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=max(2, samples // 3)))
    study.optimize(objective, n_trials=samples)
    return {"total_s": time.time() - t0, "curves": curves, "epochs": sum(len(c) for c in curves),
            "best": study.best_value, "stopped": 0}


# ----------------------------------------------------------------------------- main
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1500, help="built-in dataset rows (80%% train)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per trial")
    ap.add_argument("--samples", type=int, default=8, help="trials per sweep")
    ap.add_argument("--target", type=float, default=0.6, help="validation accuracy to reach")
    ap.add_argument("--overhead-trials", type=int, default=4, help="trials per overhead measurement")
    ap.add_argument("--skip", choices=["overhead", "sweeps"], help="leave one part out")
    ap.add_argument("--only", choices=["overhead", "cold", "sweeps"], help="run only this part (cold: the cold "
                    "trial in a process of its own and in a preloaded idle worker, each side on a fresh Ray)")
    ap.add_argument("--planning", type=float, default=5.0, help="cold part: seconds between Ray's start and fit() "
                    "for the side that stands for a driver planning the sweep")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from mmray.data.synth import synth
    from mmray.runtime import ensure_ray

    root = tempfile.mkdtemp(prefix="mmray-bench-sweep-")
    data = os.path.join(root, "synth")
    synth(data, rows=args.rows, shards=2, seed=0)
    t = time.time()
    ensure_ray()
    ray_start = time.time() - t
    print(f"data: synth rows={args.rows}; local Ray started in {ray_start:.1f}s; cpus={os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, Any] = {"args": vars(args), "ray_start_s": ray_start}

    if args.only == "cold" or (args.only is None and args.skip != "overhead"):
        print(build_decoded(data), flush=True)
        results["cold"] = cold = measure_cold(data, root, args.overhead_trials, args.planning)
        print("\n(a4) the cold trial: seconds from fit() to the first trial's first step (bare: its entry), "
              f"each side on a fresh Ray, reused actors, {args.overhead_trials} trials one at a time", flush=True)
        bare = cold["bare Tune trial"]["to_first_step"][0]
        for side, r in cold.items():
            print(f"  {side:<40} first {r['to_first_step'][0]:6.2f}s  {r['to_first_step'][0] / bare:5.2f}x bare  "
                  f"later median {median(r['to_first_step'][1:]):5.2f}s  in an idle worker: {r['idle_worker']}",
                  flush=True)
        for warm in (False, True):
            results[f"tune_start_warm={warm}"] = r = measure_tune_start(data, root, warm)
            print(f"  mmray tune, {'trials in preloaded idle workers' if warm else 'trials in processes of their own'}"
                  f": from the sweep's start to the first step of slot 1 / slot 2: {r['to_first_step'][0]:.2f}s / "
                  f"{r['to_first_step'][-1]:.2f}s", flush=True)
    if args.only == "overhead" or (args.only is None and args.skip != "overhead"):
        oh = measure_overhead(data, root, args.overhead_trials)
        results["overhead"] = oh
        print("\n(a) per-trial overhead: seconds from when a trial can start to its first training step "
              f"(median of {args.overhead_trials} trials run one at a time; first trial = cold)")
        for mode, r in oh.items():
            bare, mm = r["bare"], r["mmray"]["to first training batch"]
            print(f"  {mode}:")
            print(f"    bare Tune function trial, to entry:      first {bare[0]:5.2f}  "
                  f"later median {median(bare[1:]):5.2f}")
            for phase, xs in r["mmray"].items():
                print(f"    mmray trial, {phase:<44} first {xs[0]:5.2f}  later median {median(xs[1:]):5.2f}")
            print(f"    ratio mmray / bare, same setting: first {mm[0] / bare[0]:.2f}x  "
                  f"later {median(mm[1:]) / median(bare[1:]):.2f}x  mean {statistics.mean(mm) / statistics.mean(bare):.2f}x")
        shipped = oh["reuse_actors=True"]["mmray"]["to first training batch"]  # what `mmray tune` does
        default = oh["reuse_actors=False"]["bare"]  # a bare function trial as Tune runs it by default
        print(f"  mmray as shipped (reuse) / bare Tune trial with Tune's defaults (no reuse): first "
              f"{shipped[0] / default[0]:.2f}x  later {median(shipped[1:]) / median(default[1:]):.2f}x  "
              f"mean over {len(shipped)} trials {statistics.mean(shipped) / statistics.mean(default):.2f}x (target <= 1.5x)")

    if args.only == "sweeps" or (args.only is None and args.skip != "sweeps"):
        runs = {}
        for label, fn in (
            ("mmray TPE + ASHA", lambda: mmray_sweep(data, root, name="tpe-asha", epochs=args.epochs,
                                                     samples=args.samples, search="optuna_tpe", scheduler="asha")),
            ("mmray random, no early stopping", lambda: mmray_sweep(data, root, name="random-fifo",
                                                                    epochs=args.epochs, samples=args.samples,
                                                                    search="random", scheduler="none")),
            ("plain PyTorch + Optuna (TPE), one process", lambda: plain_optuna(data, root, epochs=args.epochs,
                                                                               samples=args.samples)),
        ):
            print(f"\nrunning: {label}", flush=True)
            runs[label] = fn()
        results["sweeps"] = runs  # with every trial's (seconds, val accuracy) curve: other targets can be read off
        # a target every run reached, so each has a time: the lowest of the runs' best accuracies
        common = min(r["best"] for r in runs.values())
        for target in dict.fromkeys([args.target, common]):
            for r in runs.values():
                r["to_target_s"] = first_hit(r["curves"], target)
            ref = runs["mmray TPE + ASHA"]["to_target_s"]
            print(f"\n(b) time to val.accuracy >= {target:.3f} ({args.samples} trials x up to {args.epochs} epochs, "
                  f"{args.rows} rows){' (the lowest best accuracy of the three runs)' if target == common else ''}")
            print(f"  {'run':<44} {'to target':>10} {'total':>8} {'epochs':>7} {'stopped':>8} {'best acc':>9} "
                  f"{'/ TPE+ASHA':>11}")
            for label, r in runs.items():
                hit = r["to_target_s"]
                ratio = f"{hit / ref:.2f}x" if hit is not None and ref else "-"
                print(f"  {label:<44} {(f'{hit:.0f}s' if hit is not None else 'not reached'):>10} "
                      f"{r['total_s']:7.0f}s {r['epochs']:>7} {r['stopped']:>8} {r['best']:>9.3f} {ratio:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (2 cores: above ~2 means the box was shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

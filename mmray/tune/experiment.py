"""The experiment folder of a sweep (``STORAGE/NAME/``): the names of its files, where its trials keep their
checkpoints, and the one reader/writer of what mmray itself writes there. Every other module asks this one.

Layout::

    job.yaml, space.yaml       what was swept (``--resume`` reads them back)
    optuna.db                  the Optuna study (``optuna-dashboard sqlite:///.../optuna.db``)
    <trial folders>/           Ray Tune's own (``<trainable>_<trial_id>_<n>_...``): an in-process trial's
                               checkpoints (``checkpoint_NNNNNN``) and result.json
    trials/<trial_id>/         each trial's ``tensorboard/`` (scalars and HParams), and a distributed trial's
                               TorchTrainer run with its ``checkpoint_epoch_NNNN`` folders
    cores.json                 in-process sweeps: CPUs, wall time and mean busy-core fraction of the last run
    leaderboard.csv, best/     written when the sweep ends (``best/`` is a model export)
    finalists/                 the finalists' runs (:mod:`mmray.tune.finalists`), a second Tune experiment: re-runs
                               with other seeds, or one run per finalist and cross-validation fold
    folds.json                 with ``finalists_cv: K``: the folds of train+val (``{"k", "seed", "assignment":
                               {"train": [fold of each row], "val": [...]}}``, :class:`mmray.data.folds.Folds`)
    budget.json                how the sweep's time was spent (:mod:`mmray.tune.budget` reads and writes it)
    best-single/, best-ensemble/, ensemble-arm.json   with ``ensemble: K``: the winner's and the top K's exports
                               and which one ``best/`` is (:mod:`mmray.tune.ensemble`)
    report/                    ``mmray report``: ``summary.md`` and the plots

No Ray: the report reads a finished experiment with none running.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, parse_yaml
from mmray.config.schema import check_run_name
from mmray.data.folds import Folds
from mmray.train.api import absolute_paths, check_dataset, check_model_files
from mmray.train.checkpoint import kept_checkpoints
from mmray.tune.space import SpaceConfig, check_against_job

JOB_FILE, SPACE_FILE, STUDY_FILE = "job.yaml", "space.yaml", "optuna.db"
LEADERBOARD, BEST_DIR = "leaderboard.csv", "best"
REPORT_DIR, SUMMARY = "report", "summary.md"
BUDGET_FILE = "budget.json"
ENSEMBLE_ARM_FILE = "ensemble-arm.json"
TRIALS_DIR = "trials"
FINALISTS_DIR = "finalists"
FOLDS_FILE = "folds.json"
CORES = "cores.json"  # mmray.tune.cores: how busy the cores were


@dataclass
class SweepSetup:
    """What a sweep runs: its experiment folder, the raw job and the search space (``job.yaml``, ``space.yaml``)."""

    experiment_dir: str
    job_raw: dict[str, Any]
    space: SpaceConfig


def prepare(job_raw: dict[str, Any], space: SpaceConfig, *, name: str, storage: str,
            explicit_name: bool = True) -> SweepSetup:
    """Validate, make the experiment folder and record what is swept. Nothing runs yet.

    An existing experiment is never reused: with ``explicit_name`` that is an error (continue it with
    ``--resume``), otherwise the next free ``NAME-2``, ``NAME-3``... is used.
    """
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
    if space.num_samples is None:
        space_doc["num_samples"] = None  # as many as the time budget allows (not the default 8)
    store.write_text(store.join(experiment_dir, SPACE_FILE), yaml.safe_dump(space_doc, sort_keys=False))
    return SweepSetup(experiment_dir, job_raw, space)


def load_setup(experiment_dir: str) -> SweepSetup:
    """The setup :func:`prepare` recorded in ``experiment_dir`` (``--resume`` and ``mmray report``)."""
    experiment_dir = store.normalize(experiment_dir)
    if not store.is_file(store.join(experiment_dir, JOB_FILE)):
        raise UserError(f"{experiment_dir}: not an mmray experiment (no {JOB_FILE})")
    job_file, space_file = store.join(experiment_dir, JOB_FILE), store.join(experiment_dir, SPACE_FILE)
    job_raw = parse_yaml(store.read_text(job_file), job_file)
    space = SpaceConfig.model_validate(parse_yaml(store.read_text(space_file), space_file))
    check_against_job(space, job_raw)
    return SweepSetup(experiment_dir, job_raw, space)


def read_leaderboard(experiment_dir: str) -> list[dict[str, str]]:
    """``leaderboard.csv``'s rows, best first (``experiment_dir`` is a local folder)."""
    with open(os.path.join(experiment_dir, LEADERBOARD), newline="") as f:
        return list(csv.DictReader(f))


def write_leaderboard(path: str, trials: list, param_keys: list[str], metric: str | None = None) -> None:
    """``leaderboard.csv`` at ``path`` (a local file): one row per trial (:class:`~mmray.tune.results.TrialRecord`),
    ranked, with its parameters and its best epoch's validation metrics."""
    metric_keys = sorted({k for t in trials for k in t.best if k.startswith(("val.", "train.loss"))
                          and not k.endswith(("confusion", ".rows"))})
    role = ["role"] if any(t.baseline for t in trials) else []  # only in sweeps with a baseline trial
    # re-checked finalists (mmray.tune.finalists): the mean and sd of the metric over their runs, and how many;
    # cross-validated ones: over their folds (the trial's own run is not one of them)
    cv = bool(metric) and any(t.fold_scores for t in trials)
    checked = (cv_columns(metric) if cv else [f"{metric}.mean", f"{metric}.sd", "runs"]
               if metric and any(t.rechecks for t in trials) else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial_id", "status", *role, *param_keys, "best_epoch", "epochs_run", *checked,
                    *metric_keys])
        for rank, t in enumerate(trials, 1):
            w.writerow([rank, t.trial_id, t.status, *(["baseline" if t.baseline else ""] if role else []),
                        *(t.params.get(k, "") for k in param_keys),
                        t.best_epoch or "", t.epochs_run, *(_checked(t, metric, cv) if checked else []),
                        *(t.best.get(k, "") for k in metric_keys)])


def cv_columns(metric: str) -> list[str]:
    """The leaderboard's columns of a cross-validated finalist: the metric's mean and sd over its folds, and how
    many folds scored."""
    return [f"{metric}.cv_mean", f"{metric}.cv_sd", "folds"]


def _checked(trial, metric: str, cv: bool) -> list:
    if not (trial.fold_scores if cv else trial.rechecks):
        return ["", "", ""] if cv else ["", "", 1]
    scores = trial.scores(metric)
    mean, sd = mean_sd(scores)
    return [round(mean, 6), round(sd, 6), len(scores)]


def write_folds(experiment_dir: str, folds) -> None:
    """``folds.json``: the cross-validation folds of train+val (:class:`mmray.data.folds.Folds`)."""
    store.write_text(store.join(experiment_dir, FOLDS_FILE), json.dumps(folds.to_json()) + "\n")


def read_folds(experiment_dir: str):
    """The :class:`~mmray.data.folds.Folds` in ``folds.json``, or None where the sweep made none."""
    path = store.join(experiment_dir, FOLDS_FILE)
    return Folds.from_json(json.loads(store.read_text(path))) if store.is_file(path) else None


# ----------------------------------------------------------------------------- trials
def write_cores(experiment_dir: str, figures: dict[str, Any]) -> None:
    store.write_text(store.join(experiment_dir, CORES), json.dumps(figures, indent=2) + "\n")


def read_cores(experiment_dir: str) -> dict[str, Any] | None:
    """The busy-core figures of the sweep's last run (``cores.json``), or None where there are none."""
    path = store.join(experiment_dir, CORES)
    return json.loads(store.read_text(path)) if store.is_file(path) else None


def trial_dir(experiment_dir: str, trial_id: str) -> str:
    """``EXPERIMENT/trials/<trial_id>``: the trial's run folder (:mod:`mmray.train.outputs`): its TensorBoard
    files and, for a distributed trial, its ``checkpoint_epoch_NNNN`` folders; a local path or a URI like the
    experiment."""
    return store.join(experiment_dir, TRIALS_DIR, trial_id)


def trial_checkpoints(experiment_dir: str, trial_id: str) -> dict[int, str]:
    """epoch -> folder of the checkpoints a distributed trial's TorchTrainer run kept (``trials/<trial_id>/``);
    {} for an in-process trial, whose checkpoints are Tune's."""
    return kept_checkpoints(trial_dir(experiment_dir, trial_id))


def trial_id_of(tune_trial_folder: str) -> str:
    """The trial id in the name of Tune's trial folder (``_run_trial_<id>_<n>_...``)."""
    return re.search(r"_run_trial_([0-9a-f]+)_", os.path.basename(tune_trial_folder.rstrip("/"))).group(1)


def trial_folder(experiment_dir: str, trial_id: str) -> str | None:
    """Ray Tune's folder of a trial (``<trainable>_<trial_id>_<n>_<params>_<time>``), or None."""
    found = [p for p in glob.glob(os.path.join(glob.escape(experiment_dir), f"*_{trial_id}_*"))
             if os.path.isdir(p) and os.path.basename(p) != TRIALS_DIR]
    return sorted(found)[0] if found else None


def trial_sequence(experiment_dir: str, trial_id: str) -> int | None:
    """The order in which Tune created the trial (the counter after the id in its folder name)."""
    folder = trial_folder(experiment_dir, trial_id)
    m = re.search(rf"_{re.escape(trial_id)}_(\d+)", os.path.basename(folder or ""))
    return int(m.group(1)) if m else None


def best_checkpoint(experiment_dir: str, trial_id: str, best_epoch: int) -> str | None:
    """The trial's checkpoint folder that holds epoch ``best_epoch`` (kept by the sweep's pruning), found by
    name alone (nothing is opened, so it works on a copy without the checkpoints' contents).

    Looks where both kinds of trial keep them: ``trials/<trial_id>/checkpoint_epoch_NNNN`` (a distributed
    trial's TorchTrainer run) and Tune's trial folder (``checkpoint_NNNNNN``, an in-process trial), whose
    ``result.json`` names the checkpoint each epoch's report made.
    """
    kept = trial_checkpoints(experiment_dir, trial_id)
    if best_epoch in kept:
        return kept[best_epoch]
    folder = trial_folder(experiment_dir, trial_id)
    name = tune_checkpoint_name(folder, best_epoch) if folder else None
    return os.path.join(folder, name) if name and os.path.isdir(os.path.join(folder, name)) else None


def tune_checkpoint_name(trial_folder_path: str, epoch: int) -> str | None:
    """The ``checkpoint_NNNNNN`` that Tune saved with the report of ``epoch`` (the last such report: a
    restarted trial reports an epoch again), from the trial folder's ``result.json``."""
    path = os.path.join(trial_folder_path, "result.json")
    if not os.path.isfile(path):
        return None
    name = None
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed trial
            if int(row.get("epoch", -1)) == epoch and row.get("checkpoint_dir_name"):
                name = row["checkpoint_dir_name"]
    return name


def mean_sd(scores: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one score)."""
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))

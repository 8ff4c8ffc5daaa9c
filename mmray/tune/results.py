"""After a sweep: the leaderboard (ranked by each trial's best epoch), HParams for TensorBoard, and ``best/``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.loader import apply_overrides
from mmray.data.dataset_dir import read_dataset_info
from mmray.train.checkpoint import read_train_state
from mmray.train.finalize import best_kept, export_checkpoint, measure_checkpoint, supervised_best
from mmray.train.outputs import tensorboard_dir
from mmray.tune import finalists
from mmray.tune.baseline import is_baseline
from mmray.tune.budget import read_ledger, spending_lines
from mmray.tune.ensemble import arm_lines, ensemble_arm
from mmray.tune.experiment import (
    BEST_DIR,
    LEADERBOARD,
    STUDY_FILE,
    trial_checkpoints,
    trial_dir,
    trial_id_of,
    write_leaderboard,
)

SHOWN = ("val.accuracy", "val.f1", "val.loss", "test.accuracy")


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped (early: scheduler or patience) | budget (the time budget ran out) | error | pending
    epochs_run: int
    best_epoch: int | None
    best: dict[str, float]  # the best epoch's metrics
    best_checkpoint: str | None
    error: str | None = None
    baseline: bool = False  # the job's own values (``baseline: true`` in the space)
    rechecks: list[float] = field(default_factory=list)  # a finalist's re-runs' scores (mmray.tune.finalists)
    fold_scores: list[float] = field(default_factory=list)  # a cross-validated finalist's score on each fold

    @property
    def rechecked(self) -> bool:
        """A finalist with re-runs or cross-validation folds that scored."""
        return bool(self.rechecks or self.fold_scores)

    def scores(self, metric: str) -> list[float]:
        """What a finalist is ranked on: its folds' held-out scores when cross-validated; otherwise every run's
        best-epoch ``metric``, this trial's then its re-runs' (finalists only)."""
        if self.fold_scores:
            return list(self.fold_scores)
        return [float(self.best[metric]), *self.rechecks] if metric in self.best else list(self.rechecks)


@dataclass
class SweepSummary:
    experiment_dir: str
    metric: str
    mode: str
    trials: list[TrialRecord]
    best_dir: str | None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    baseline_metrics: dict[str, Any] = field(default_factory=dict)  # its best epoch on val and test
    report_path: str | None = None  # report/summary.md, once written
    report_verdicts: str = ""  # the report's winner-vs-control lines
    spending: list[str] = field(default_factory=list)  # how the sweep's time was spent (budget.json)
    ensemble: dict[str, Any] | None = None  # the ensemble arm (mmray.tune.ensemble), when the space asks for one
    cores: dict[str, Any] | None = None  # in-process sweeps: cpus, wall_s, busy_fraction (mmray.tune.cores)
    folds: int | None = None  # the finalists' cross-validation folds (finalists_cv), when they were cross-validated

    @property
    def best_trial(self) -> TrialRecord | None:
        return self.trials[0] if self.trials and self.trials[0].best_epoch is not None else None

    @property
    def baseline_trial(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.baseline), None)

    @property
    def tensorboard_command(self) -> str:
        return f"tensorboard --logdir {self.experiment_dir}"


def _record(result, setup, metric: str, mode: str) -> TrialRecord:
    params = dict(result.config or {})
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or trial_id_of(result.path)
    sign = 1 if mode == "max" else -1
    if result.checkpoint is not None:  # in-process trial: checkpoints are Tune's
        history = read_train_state(_location(result.checkpoint))["history"]
        best_ckpt = result.get_best_checkpoint(metric=metric, mode=mode)
        best_path = _location(best_ckpt) if best_ckpt else None
    else:  # distributed trial: checkpoints are its TorchTrainer run's (Tune only sees their paths)
        kept = trial_checkpoints(setup.experiment_dir, trial_id)
        history = read_train_state(kept[max(kept)])["history"] if kept else []
        best_path = best_kept(kept, metric, mode)
    epochs = validate_job(apply_overrides(setup.job_raw, params.items())).train.epochs
    # contrastive pre-training epochs (untrained heads) never rank a trial; the export skips them too
    supervised = [m for m in history if not m.get("train.contrastive_pretraining")]
    best = max(supervised, key=lambda m: sign * m[metric]) if supervised else {}
    epochs_run = len(history)
    status = "error" if result.error else "completed" if epochs_run >= epochs else "stopped" if history else "pending"
    return TrialRecord(trial_id, params, status, epochs_run, int(best["epoch"]) if best else None, best,
                       best_path, str(result.error) if result.error else None)


def _location(checkpoint) -> str:
    """A Tune checkpoint's folder as a local path or a URI (Ray gives the path inside its filesystem)."""
    return store.to_uri(checkpoint.filesystem, checkpoint.path)


def prune_checkpoints(result, keep_best: int, metric: str, mode: str) -> None:
    """Keep a finished trial's ``keep_best`` best checkpoints and its latest; delete the rest."""
    ranked = sorted(result.best_checkpoints, key=lambda cm: cm[1].get(metric, float("nan")),
                    reverse=(mode == "max"))
    keep = {c.path for c, _ in ranked[:keep_best]}
    if result.checkpoint is not None:
        keep.add(result.checkpoint.path)
    for c, _ in ranked[keep_best:]:
        if c.path not in keep:
            store.remove(_location(c))


def store_study(path: str, name: str, space, trials: list[TrialRecord]) -> None:
    """Write the sweep as an Optuna study (SQLite) for ``optuna-dashboard`` and importance analysis.

    Each trial's objective is its best epoch's metric, the same number the leaderboard ranks by.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB" in the summary

    if os.path.exists(path):
        os.remove(path)  # rewritten whole: a resumed sweep re-stores every trial
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}",
                                direction="maximize" if space.resolved_mode == "max" else "minimize")
    for t in trials:
        dists = {k: space.parameters[k].distribution() for k in t.params
                 if k in space.parameters and space.parameters[k].distribution() is not None}
        params = {k: t.params[k] for k in dists}
        done = t.best_epoch is not None and t.status != "error"
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=float(t.best[space.metric]) if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL,
            user_attrs={"trial_id": t.trial_id, "status": t.status, "best_epoch": t.best_epoch or 0,
                        "baseline": t.baseline}))


def write_hparams(experiment_dir: str, trial: TrialRecord, metric: str) -> None:
    """HParams plugin data in the trial's TensorBoard folder: its parameters and its best-epoch metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    if not trial.best:
        return
    params = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in trial.params.items()}
    best = {f"best/{k}": float(trial.best[k]) for k in ("val.accuracy", "val.f1", "val.loss") if k in trial.best}
    writer = SummaryWriter(tensorboard_dir(trial_dir(experiment_dir, trial.trial_id)))
    for summary in hparams(params, best):
        writer.file_writer.add_summary(summary)
    for k, v in best.items():
        writer.add_scalar(k, v, trial.best_epoch)
    writer.close()


def finish(setup, results, recheck=None) -> SweepSummary:
    """Rank trials by their best epoch, write ``leaderboard.csv``, HParams and the best trial's export.

    ``recheck(trials)``: called with the ranked trials before anything is written; it sets the finalists'
    ``rechecks`` or ``fold_scores`` (:func:`mmray.tune.finalists.recheck`), and they are ranked by their mean.
    ``best/`` is the winner's own best checkpoint either way."""
    space, exp = setup.space, setup.experiment_dir
    metric, mode = space.metric, space.resolved_mode
    trials = [_record(r, setup, metric, mode) for r in results]
    ledger = read_ledger(exp)
    for t in trials:  # cut short by the time budget rather than by the scheduler
        if t.status == "stopped" and t.trial_id in ledger.stopped_by_budget:
            t.status = "budget"
    if space.baseline:
        point = space.baseline_point(setup.job_raw)
        for t in trials:
            t.baseline = is_baseline(t.params, point)
    keep = validate_job(setup.job_raw).checkpoint.num_to_keep
    for r, t in zip(results, trials):
        if t.status in ("completed", "stopped", "budget") and r.checkpoint is not None:
            prune_checkpoints(r, keep, metric, mode)
    sign = 1 if mode == "max" else -1
    trials.sort(key=lambda t: (t.best_epoch is None, -sign * t.best.get(metric, 0.0)))
    if recheck is not None:
        recheck(trials)
        trials = finalists.rank(trials, metric, mode, space.finalists)
    param_keys = [k for k, _ in space.ordered_parameters()]
    staged = store.StagedDir(exp)  # written locally, uploaded when exp is a URI
    write_leaderboard(staged.path(LEADERBOARD), trials, param_keys, metric)
    store_study(staged.path(STUDY_FILE), store.split(exp)[1], space, trials)
    for t in trials:
        write_hparams(staged.local, t, metric)
    staged.close()
    summary = SweepSummary(exp, metric, mode, trials, None)
    if any(t.fold_scores for t in trials):
        summary.folds = space.finalists_cv
    winner = summary.best_trial
    summary.spending = spending_lines(ledger, {t.trial_id: t.status for t in trials},
                                      winner.trial_id if winner else None)
    if winner is not None and winner.best_checkpoint:
        config = validate_job(apply_overrides(setup.job_raw, winner.params.items()))
        info = read_dataset_info(config.data.path)
        summary.best_dir = store.join(exp, BEST_DIR)
        summary.best_metrics = export_checkpoint(config, info, supervised_best(config, winner.best_checkpoint),
                                                summary.best_dir)
        if space.ensemble >= 2:

            summary.ensemble = ensemble_arm(setup, trials, summary.best_metrics)
    base = summary.baseline_trial
    if base is not None and base.best_checkpoint:
        summary.baseline_metrics = (summary.best_metrics if base is winner
                                    else checkpoint_metrics(setup, base))
    return summary


def checkpoint_metrics(setup, trial: TrialRecord) -> dict[str, Any]:
    """A trial's best checkpoint measured on val and test, as the export measures the winner's."""
    config = validate_job(apply_overrides(setup.job_raw, trial.params.items()))
    return measure_checkpoint(config, read_dataset_info(config.data.path), trial.best_checkpoint)[2]


def format_summary(summary: SweepSummary) -> str:
    """The terminal summary ``mmray tune`` prints: trials by status, the winner and its export, the baseline,
    the leaderboard, the report and the TensorBoard command."""
    lines = [f"experiment:  {summary.experiment_dir}",
             f"trials:      {len(summary.trials)} ("
             + ", ".join(f"{s} {sum(t.status == s for t in summary.trials)}"
                         for s in ("completed", "stopped", "budget", "error", "pending")
                         if any(t.status == s for t in summary.trials)) + ")"]
    w = summary.best_trial
    if w is not None:
        lines.append(f"best trial:  {w.trial_id}  epoch {w.best_epoch}  {summary.metric} {w.best[summary.metric]:.4f}")
        lines += finalist_lines(summary)
        for k, v in w.params.items():
            lines.append(f"  {k} = {v}")
        m = summary.best_metrics
        if "test.accuracy" in m:
            lines.append(f"best model:  test accuracy {m['test.accuracy']:.4f}  test F1 {m['test.f1']:.4f}")
        lines.append(f"export:      {summary.best_dir}")
    lines += _baseline_lines(summary)

    lines += [f"ensemble:    {line}" if i == 0 else f"  {line}" for i, line in enumerate(arm_lines(summary.ensemble))]
    lines += [f"time:        {line}" if i == 0 else f"  {line}" for i, line in enumerate(summary.spending)]
    if summary.cores and summary.cores.get("busy_fraction") is not None:
        c = summary.cores
        lines.append(f"cores busy:  {c['busy_fraction']:.0%} of {c['cpus']} CPUs over {c['wall_s']:.0f} s "
                     f"(CPUs given to running trials, mean over the sweep)")
    lines.append(f"leaderboard: {store.join(summary.experiment_dir, LEADERBOARD)}")
    if summary.report_path:
        lines.append(f"report:      {summary.report_path}")
        lines += [f"  {v}" for v in summary.report_verdicts.splitlines() if v]
    lines.append(f"tensorboard: {summary.tensorboard_command}")
    return "\n".join(lines)


def finalist_lines(summary: SweepSummary) -> list[str]:
    """The re-checked (or cross-validated) finalists, mean +- sd of their runs (folds), the winner first."""
    checked = [t for t in summary.trials if t.rechecked]
    if not checked:
        return []
    cv = any(t.fold_scores for t in checked)
    if cv:
        k = summary.folds or max(len(t.fold_scores) for t in checked)
        lines = [f"finalists:   the top {len(checked)} scored by {k}-fold cross-validation over train+val; "
                 f"{summary.metric} on each held-out fold, mean +- sd (the best mean wins):"]
    else:
        lines = [f"finalists:   the top {len(checked)} trained again with other seeds; {summary.metric} over each "
                 f"one's runs, mean +- sd (the best mean wins):"]
    for t in checked:
        scores = t.scores(summary.metric)
        mean, sd = finalists.mean_sd(scores)
        lines.append(f"  {t.trial_id}  {mean:.4f} +- {sd:.4f}  ({len(scores)} {'folds' if cv else 'runs'}: "
                     + ", ".join(f"{v:.4f}" for v in scores) + ")")
    return lines


def _baseline_lines(summary: SweepSummary) -> list[str]:
    """The winner against the job as is (the baseline trial), on validation and test."""
    base, w = summary.baseline_trial, summary.best_trial
    if base is None or w is None:
        return []
    if base is w:
        return ["baseline:    the winner is the baseline itself (the job as is): no trial beat it on "
                + summary.metric]
    b, m = summary.baseline_metrics, summary.best_metrics
    lines = [f"baseline:    trial {base.trial_id} (the job as is), best epoch {base.best_epoch}"]
    for k in ("val.accuracy", "test.accuracy"):
        if k in b and k in m:
            lines.append(f"  {k:<13} winner {m[k]:.4f}  baseline {b[k]:.4f}  difference {m[k] - b[k]:+.4f}")
    return lines

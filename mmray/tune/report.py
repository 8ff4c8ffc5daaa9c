"""``mmray report EXPERIMENT_DIR``: plots and a Markdown summary of a finished sweep, in ``report/``.

Reads only what the sweep left on disk (no Ray): ``job.yaml``, ``space.yaml``, ``leaderboard.csv``,
the Optuna study ``optuna.db`` (each trial's value is its best epoch's metric) and the trials'
checkpoints. An experiment stored at a URI (``s3://...``) is read from a local copy without the
checkpoints' contents (the two the control arms need are fetched) and its ``report/`` is uploaded there.
Writes::

    report/summary.md            everything below, with the plots inline
    report/history.png           each trial's best metric in the order trials started, and the best so far
    report/importance.png        fANOVA parameter importances (needs >= 2 completed trials, a varying parameter)
    report/parallel.png          parallel coordinates of the parameters vs the metric
    report/fusions.png           best metric per fusion method (when the space varies model.fusion.name)
    report/control_arms.png      winner vs simpler models on the test split, paired bootstrap CIs
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from mmray import storage as store
from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides
from mmray.export.writer import EXPORT_METRICS_FILE, read_metrics
from mmray.tune import control_arms as arms
from mmray.tune import report_plots as plots
from mmray.tune.budget import read_ledger, spending_lines
from mmray.tune.ensemble import arm_lines, read_arm
from mmray.tune.experiment import (
    BEST_DIR,
    FOLDS_FILE,
    LEADERBOARD,
    REPORT_DIR,
    STUDY_FILE,
    SUMMARY,
    SweepSetup,
    best_checkpoint,
    cv_columns,
    load_setup,
    read_leaderboard,
    trial_sequence,
)
from mmray.tune.space import SpaceConfig

TOP = 10
MODALITIES_KEY, FUSION_KEY = "data.modalities", "model.fusion.name"
BASELINE_ARM = "baseline trial (the job as is)"


@dataclass
class Trial:
    """One trial as the stored study and the job describe it."""

    trial_id: str
    sequence: int  # order started
    status: str
    value: float | None  # best-epoch metric; None unless completed or stopped
    best_epoch: int | None
    params: dict[str, Any]  # the space's values for this trial (drawn and fixed)
    modalities: tuple[str, ...]
    fusion: str
    baseline: bool = False  # the job's own values (a space with `baseline: true`)

    @property
    def scored(self) -> bool:
        return self.value is not None


@dataclass
class ControlArm:
    name: str  # "best single-modality trial" / "best concat trial"
    control: Trial | None = None
    comparison: arms.Comparison | None = None
    skipped: str | None = None  # why there is no comparison


@dataclass
class Report:
    experiment_dir: str
    metric: str
    mode: str
    trials: list[Trial]  # in the order they started
    winner: Trial | None
    plots: dict[str, str] = field(default_factory=dict)  # section -> file name in report/
    notes: dict[str, str] = field(default_factory=dict)  # section -> why it was skipped
    importances: dict[str, float] = field(default_factory=dict)
    fusion_best: dict[str, float] = field(default_factory=dict)
    arms: list[ControlArm] = field(default_factory=list)
    location: str = ""  # where the experiment is stored when experiment_dir is a local copy of it (a URI)

    @property
    def shown_dir(self) -> str:
        """The experiment as the user named it (a URI for a copy)."""
        return self.location or self.experiment_dir

    @property
    def published_dir(self) -> str:
        """Where the report ends up: ``report/`` of the experiment, wherever it is stored."""
        return store.join(self.location, REPORT_DIR) if self.location else self.report_dir

    @property
    def published_summary(self) -> str:
        return store.join(self.published_dir, SUMMARY)

    @property
    def report_dir(self) -> str:
        return os.path.join(self.experiment_dir, REPORT_DIR)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.report_dir, SUMMARY)


# ----------------------------------------------------------------------------- reading the experiment
def _load_study(exp: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=None, storage=f"sqlite:///{os.path.join(exp, STUDY_FILE)}")


def _space_values(space: SpaceConfig, drawn: dict[str, Any]) -> dict[str, Any]:
    """The trial's drawn values plus the space's fixed values active for them, in dependency order."""
    values: dict[str, Any] = {}
    for key, spec in space.ordered_parameters():
        if key in drawn:
            values[key] = drawn[key]
        elif spec.value is not None and space.active(key, values):
            values[key] = spec.value
    return values


def _trials(setup: SweepSetup, study) -> list[Trial]:
    out = []
    for t in study.trials:
        trial_id = str(t.user_attrs.get("trial_id", t.number))
        params = _space_values(setup.space, dict(t.params))
        config = validate_job(apply_overrides(setup.job_raw, params.items()))
        seq = trial_sequence(setup.experiment_dir, trial_id)
        done = t.state.name == "COMPLETE" and t.value is not None
        out.append(Trial(trial_id, seq if seq is not None else 10_000 + t.number, str(t.user_attrs.get("status", "")),
                         float(t.value) if done else None, int(t.user_attrs["best_epoch"]) if done else None,
                         params, tuple(config.data.modalities), config.model.fusion.name,
                         bool(t.user_attrs.get("baseline", False))))
    return sorted(out, key=lambda t: t.sequence)


def open_experiment(experiment_dir: str) -> tuple[SweepSetup, list[dict[str, str]], Any]:
    """The sweep's setup, leaderboard rows and Optuna study.

    Raises:
        UserError: not an experiment folder, or the sweep has not finished (no leaderboard or study yet).
    """
    if not os.path.isdir(experiment_dir):
        raise UserError(f"{experiment_dir}: no such folder")
    setup = load_setup(experiment_dir)  # UserError when there is no job.yaml
    exp = setup.experiment_dir
    for name in (LEADERBOARD, STUDY_FILE):
        if not os.path.isfile(os.path.join(exp, name)):
            raise UserError(f"{exp}: no {name}; the sweep has not finished "
                            f"(finish it with `mmray tune --resume {exp}`)")
    return setup, read_leaderboard(exp), _load_study(exp)


# ----------------------------------------------------------------------------- sections
def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _best(trials: list[Trial], mode: str) -> Trial | None:
    best = None
    for t in trials:
        if t.scored and (best is None or _better(t.value, best.value, mode)):
            best = t
    return best


def _history(rep: Report) -> None:
    # x = position among all trials, so a failed trial leaves a gap
    scored = [(i + 1, t) for i, t in enumerate(rep.trials) if t.scored]
    if not scored:
        rep.notes["history"] = "no trial finished an epoch, so there is nothing to plot"
        return
    win = next((i for i, (_, t) in enumerate(scored) if rep.winner and t.trial_id == rep.winner.trial_id), None)
    plots.plot_history([x for x, _ in scored], [t.value for _, t in scored], metric=rep.metric,
                       mode=rep.mode, winner_index=win, path=os.path.join(rep.report_dir, "history.png"))
    rep.plots["history"] = "history.png"


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _varying(rep: Report, space: SpaceConfig) -> list[str]:
    """Drawn parameters that took at least two values among the scored trials."""
    scored = [t for t in rep.trials if t.scored]
    return [k for k, spec in space.ordered_parameters()
            if spec.value is None and len({_key(t.params[k]) for t in scored if k in t.params}) >= 2]


def _importance(rep: Report, space: SpaceConfig, study) -> None:
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    n = sum(t.scored for t in rep.trials)
    varying = _varying(rep, space)
    if n < 2:
        rep.notes["importance"] = f"needs at least 2 completed trials; this sweep has {n}"
        return
    if not varying:
        rep.notes["importance"] = "no parameter took more than one value among the completed trials"
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as e:  # e.g. conditional parameters no two trials share
        rep.notes["importance"] = f"Optuna could not compute fANOVA importances: {e}"
        return
    if not imp:
        rep.notes["importance"] = "no parameter is shared by every completed trial (conditional parameters)"
        return
    rep.importances = {k: float(v) for k, v in imp.items() if k in varying}  # a constant parameter scores 0
    plots.plot_importances(rep.importances, metric=rep.metric, path=os.path.join(rep.report_dir, "importance.png"))
    rep.plots["importance"] = "importance.png"


def _label(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _parallel(rep: Report, space: SpaceConfig) -> None:
    scored = [t for t in rep.trials if t.scored]
    varying = _varying(rep, space)
    if not scored or not varying:
        rep.notes["parallel"] = ("no completed trial" if not scored
                                 else "no parameter took more than one value among the completed trials")
        return
    axes = []
    for k in varying:
        spec = space.parameters[k]
        values = [t.params.get(k) for t in scored]
        if spec.choice is not None:
            axes.append(plots.ParallelAxis(k, [None if v is None else _label(v) for v in values],
                                           categories=[_label(c) for c in spec.choice]))
        else:
            axes.append(plots.ParallelAxis(k, values, log=spec.loguniform is not None or spec.log))
    plots.plot_parallel(axes, [t.value for t in scored], metric=rep.metric, mode=rep.mode,
                        path=os.path.join(rep.report_dir, "parallel.png"))
    rep.plots["parallel"] = "parallel.png"


def _fusions(rep: Report, space: SpaceConfig) -> None:
    spec = space.parameters.get(FUSION_KEY)
    if spec is None or len(spec.probe_values()) < 2:
        used = sorted({t.fusion for t in rep.trials})
        rep.notes["fusions"] = (f"the space does not vary `{FUSION_KEY}`; every trial used "
                                f"{', '.join(f'`{u}`' for u in used)}")
        return
    for name in [str(c) for c in spec.probe_values()]:
        best = _best([t for t in rep.trials if t.fusion == name], rep.mode)
        if best is not None:
            rep.fusion_best[name] = best.value
    if not rep.fusion_best:
        rep.notes["fusions"] = "no trial finished an epoch"
        return
    missing = [str(c) for c in spec.probe_values() if str(c) not in rep.fusion_best]
    if missing:
        rep.notes["fusions_missing"] = ", ".join(f"`{m}`" for m in missing)
    plots.plot_fusions(rep.fusion_best, metric=rep.metric, winner=rep.winner.fusion if rep.winner else None,
                       path=os.path.join(rep.report_dir, "fusions.png"))
    rep.plots["fusions"] = "fusions.png"


def _checkpoint(rep: Report, trial: Trial) -> str:
    path = best_checkpoint(rep.experiment_dir, trial.trial_id, trial.best_epoch)
    if path is None:
        raise UserError(f"trial {trial.trial_id}: no checkpoint of its best epoch {trial.best_epoch} was found")
    if rep.location:  # a copy made without the checkpoints' contents: fetch just this one
        rel = os.path.relpath(path, rep.experiment_dir).replace(os.sep, "/")
        store.download(store.join(rep.location, rel), path)
    return path


def _control_arms(rep: Report, space: SpaceConfig, *, resamples: int, seed: int) -> None:
    w = rep.winner
    single = ControlArm("best single-modality trial")
    if MODALITIES_KEY not in space.parameters or len(space.parameters[MODALITIES_KEY].probe_values()) < 2:
        single.skipped = f"the space never varies `{MODALITIES_KEY}`, so there is no single-modality trial"
    elif w is not None and len(w.modalities) == 1:
        single.skipped = f"the winner itself reads one modality ({w.modalities[0]})"
    else:
        candidates = [t for t in rep.trials if len(t.modalities) == 1]
        single.control = _best(candidates, rep.mode)
        if single.control is None:
            single.skipped = ("no single-modality trial finished an epoch" if candidates
                              else "the sweep drew no single-modality trial")
    concat = ControlArm("best concat trial")
    if w is not None and w.fusion == "concat":
        concat.skipped = "the winner is itself a concat trial"
    else:
        candidates = [t for t in rep.trials if t.fusion == "concat"]
        concat.control = _best(candidates, rep.mode)
        if concat.control is None:
            concat.skipped = ("no concat trial finished an epoch" if candidates
                              else "the sweep ran no concat trial")
    rep.arms = [single, concat]
    if space.baseline:
        base = ControlArm(BASELINE_ARM)
        found = next((t for t in rep.trials if t.baseline), None)
        if found is None:
            base.skipped = "the sweep ran no baseline trial"
        elif w is not None and found.trial_id == w.trial_id:
            base.skipped = "the winner is the baseline itself: no trial beat the job as is"
        elif not found.scored:
            base.skipped = "the baseline trial finished no epoch"
        else:
            base.control = found
        rep.arms.insert(0, base)
        if concat.control is not None and found is not None and concat.control.trial_id == found.trial_id:
            concat.control, concat.skipped = None, "the best concat trial is the baseline trial, compared above"
    if w is None:
        for arm in rep.arms:
            arm.skipped, arm.control = "no winner: no trial finished an epoch", None
        return
    pending = [a for a in rep.arms if a.control is not None]
    if not pending:
        return
    try:
        winner_preds = arms.predict_test(_checkpoint(rep, w))
        for arm in pending:
            try:
                arm.comparison = arms.compare(winner_preds, arms.predict_test(_checkpoint(rep, arm.control)),
                                              resamples=resamples, seed=seed)
            except UserError as e:
                arm.skipped = str(e)
    except UserError as e:  # the winner's checkpoint or the dataset is gone
        for arm in pending:
            arm.skipped = str(e)
    done = [a for a in rep.arms if a.comparison is not None]
    if done:
        plots.plot_control_arms([f"vs {a.name}\n({_describe(a.control)})\ntest acc {a.comparison.winner_accuracy:.3f}"
                                 f" vs {a.comparison.control_accuracy:.3f}" for a in done],
                                [a.comparison.ci.difference for a in done], [a.comparison.ci.low for a in done],
                                [a.comparison.ci.high for a in done], level=done[0].comparison.ci.level,
                                path=os.path.join(rep.report_dir, "control_arms.png"))
        rep.plots["control_arms"] = "control_arms.png"


def _describe(t: Trial) -> str:
    return f"{t.trial_id}: {t.fusion}, {'+'.join(t.modalities)}"


# ----------------------------------------------------------------------------- Markdown
def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _num(s: str) -> Any:
    try:
        return float(s) if any(c in s for c in ".eE") else int(s)
    except ValueError:
        return s


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows)]


def _image(rep: Report, section: str, alt: str) -> list[str]:
    if section in rep.plots:
        return [f"![{alt}]({rep.plots[section]})", ""]
    return [f"_Skipped: {rep.notes[section]}._", ""]


def _leaderboard_md(rep: Report, rows: list[dict[str, str]], space: SpaceConfig) -> list[str]:
    params = [k for k, _ in space.ordered_parameters() if rows and k in rows[0]]
    metrics = [m for m in dict.fromkeys([rep.metric, "val.accuracy", "val.f1", "val.loss"]) if rows and m in rows[0]]
    role = ["role"] if rows and "role" in rows[0] else []
    header = ["rank", "trial_id", "status", *role, *params, "best_epoch", "epochs_run", *metrics]
    checked = _checked_columns(rows, rep.metric)
    if checked:  # finalists checked twice (mmray.tune.finalists): mean +- sd over their runs, or their folds
        header.append(f"{rep.metric} CV mean ± sd (folds)" if checked[2] == "folds"
                      else f"{rep.metric} mean ± sd (runs)")
    return _table(header, [[_num(r.get(h, "")) if h not in ("trial_id", "status", "role") else r.get(h, "")
                            for h in header[:len(header) - bool(checked)]]
                           + ([_mean_sd(r, checked)] if checked else [])
                           for r in rows[:TOP]])


def _checked_columns(rows: list[dict[str, str]], metric: str) -> list[str]:
    """The leaderboard's mean, sd and count columns of re-checked or cross-validated finalists ([] for none)."""
    for columns in (cv_columns(metric), [f"{metric}.mean", f"{metric}.sd", "runs"]):
        if rows and columns[0] in rows[0]:
            return columns
    return []


def _mean_sd(row: dict[str, str], columns: list[str]) -> str:
    mean, sd, count = columns
    if not row.get(mean):
        return ""
    return f"{float(row[mean]):.4f} ± {float(row[sd]):.4f} ({row[count]})"


def _finalists_line(leaderboard: list[dict[str, str]], metric: str) -> list[str]:
    """How the winner was chosen among the finalists, when they were checked twice."""
    checked = _checked_columns(leaderboard, metric)
    n = sum(bool(r.get(checked[0])) for r in leaderboard) if checked else 0
    if not n:
        return []
    if checked[2] == "folds":
        k = max(int(r["folds"]) for r in leaderboard if r.get("folds"))
        return [f"- finalists: the top {n} scored by {k}-fold cross-validation over train+val (folds stratified by "
                f"label; each trained on the other folds and scored on the held-out one; `{FOLDS_FILE}` holds "
                f"them); the winner is the best {metric} mean over the folds, and its export is its own best "
                f"checkpoint from the sweep"]
    return [f"- finalists: the top {n} trained again with other seeds; the winner is the best {metric} mean over "
            f"each one's runs"]


def _arms_md(rep: Report) -> list[str]:
    out = ["Each comparison predicts the test split with both trials' best-epoch checkpoints and bootstraps "
           "the paired accuracy difference (winner - control) over the test rows both models could read.", ""]
    done = [a for a in rep.arms if a.comparison is not None]
    if done:
        c0 = done[0].comparison.ci
        out += _table(
            ["control arm", "control trial", "winner test acc", "control test acc", "difference",
             f"{c0.level:.0%} CI", "rows", "verdict"],
            [[a.name, _describe(a.control), a.comparison.winner_accuracy, a.comparison.control_accuracy,
              f"{a.comparison.ci.difference:+.4f}", f"[{a.comparison.ci.low:+.4f}, {a.comparison.ci.high:+.4f}]",
              a.comparison.ci.rows, a.comparison.verdict] for a in done])
        out += ["", f"Paired bootstrap: {c0.resamples} resamples of the test rows, seeded, percentile interval.", ""]
        out += _image(rep, "control_arms", "winner vs control arms")
    for a in rep.arms:
        if a.comparison is None:
            out += [f"- {a.name}: skipped; {a.skipped}."]
    return out + [""]


def render_markdown(rep: Report, leaderboard: list[dict[str, str]], space: SpaceConfig) -> str:
    exp, shown, w = rep.experiment_dir, rep.shown_dir, rep.winner
    counts = {}
    for t in rep.trials:
        counts[t.status or "unknown"] = counts.get(t.status or "unknown", 0) + 1
    lines = [f"# Sweep report: {os.path.basename(shown.rstrip('/'))}", "",
             f"- experiment: `{shown}`",
             f"- metric: `{rep.metric}` ({rep.mode}); each trial is scored by its best epoch",
             f"- trials: {len(rep.trials)} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"]
    lines += [f"- {line}" for line in spending_lines(read_ledger(exp), {t.trial_id: t.status for t in rep.trials},
                                                     w.trial_id if w is not None else None)]
    lines += _finalists_line(leaderboard, rep.metric)
    if w is not None:
        lines.append(f"- winner: trial `{w.trial_id}`, epoch {w.best_epoch}, {rep.metric} {w.value:.4f}")
    lines += ["", "## Winner", ""]
    if w is None:
        lines += ["No trial finished an epoch.", ""]
    else:
        lines += _table(["parameter", "value"], [[k, _label(v) if isinstance(v, (list, tuple)) else v]
                                                 for k, v in w.params.items()])
        lines += ["", f"Fusion `{w.fusion}`, modalities {', '.join(w.modalities)}."]
        if os.path.isfile(os.path.join(exp, BEST_DIR, EXPORT_METRICS_FILE)):
            m = read_metrics(os.path.join(exp, BEST_DIR))
            scores = ", ".join(f"{k} {m[k]:.4f}" for k in ("val.accuracy", "test.accuracy", "test.f1") if k in m)
            lines += [f"Its export is `{store.join(shown, BEST_DIR)}` ({scores})."]
        lines.append("")
    lines += ["## Leaderboard (top 10)", ""] + _leaderboard_md(rep, leaderboard, space) + [""]
    lines += ["## Optimisation history", "", "Each completed trial's best-epoch metric, in the order the trials "
              "started, and the best so far.", ""] + _image(rep, "history", "optimisation history")
    lines += ["## Parameter importance (fANOVA)", ""]
    if rep.importances:
        lines += _table(["parameter", "importance"], [[k, v] for k, v in rep.importances.items()]) + [""]
        lines += ["With few trials these importances are rough; they say which parameters moved the metric in "
                  "this sweep, not in general.", ""]
    lines += _image(rep, "importance", "parameter importances")
    lines += ["## Parameters vs metric", ""] + _image(rep, "parallel", "parallel coordinates")
    lines += ["## Fusion methods", ""]
    if rep.fusion_best:
        lines += _table(["fusion", f"best {rep.metric}"], [[k, v] for k, v in rep.fusion_best.items()]) + [""]
    if "fusions_missing" in rep.notes:
        lines += [f"No completed trial used {rep.notes['fusions_missing']}.", ""]
    lines += _image(rep, "fusions", "best score per fusion method")
    lines += ["## Control arms", ""] + _arms_md(rep)

    ensemble = arm_lines(read_arm(exp))
    if ensemble:
        lines += ["## Ensemble vs single winner", "", *[f"- {line}" for line in ensemble], ""]
    lines += ["## Look further", "", "```bash",
              f"tensorboard --logdir {shown}",
              f"optuna-dashboard sqlite:///{STUDY_FILE}   # a local copy of {store.join(shown, STUDY_FILE)}"
              if rep.location else f"optuna-dashboard sqlite:///{os.path.join(exp, STUDY_FILE)}",
              "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point
def build_report(experiment_dir: str, *, resamples: int = arms.RESAMPLES, seed: int = arms.SEED) -> Report:
    """Read the experiment and write ``report/`` (the plots and ``summary.md``); returns what it found.

    Args:
        resamples, seed: of the control arms' paired bootstrap.

    Raises:
        UserError: not an experiment folder, or a sweep that has not finished.
    """
    with warnings.catch_warnings():  # Optuna warns on every read of list-valued choices (data.modalities)
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution", category=UserWarning)
        if not store.is_uri(experiment_dir):
            return _build(experiment_dir, resamples=resamples, seed=seed)
        return _build_remote(store.normalize(experiment_dir), resamples=resamples, seed=seed)


def _build_remote(uri: str, *, resamples: int, seed: int) -> Report:
    """The report of an experiment stored at a URI: built on a local copy of everything but the checkpoints'
    contents (two are fetched, for the control arms), then ``report/`` is uploaded next to the experiment."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmray-report-") as tmp:
        local = store.download_tree(uri, os.path.join(tmp, store.split(uri)[1] or "experiment"),
                                    leave_out=lambda name: name.startswith("checkpoint_"))
        try:
            rep = _build(local, resamples=resamples, seed=seed, location=uri)
        except UserError as e:  # name the experiment as the user did, not the temporary copy
            raise UserError(str(e).replace(local, uri)) from None
        store.upload(rep.report_dir, rep.published_dir)
    return rep


def _build(experiment_dir: str, *, resamples: int, seed: int, location: str = "") -> Report:
    setup, leaderboard, study = open_experiment(experiment_dir)
    space, exp = setup.space, setup.experiment_dir
    trials = _trials(setup, study)
    by_id = {t.trial_id: t for t in trials}
    winner = by_id.get(leaderboard[0]["trial_id"]) if leaderboard else None
    if winner is not None and not winner.scored:
        winner = None
    rep = Report(exp, space.metric, space.resolved_mode, trials, winner, location=location)
    os.makedirs(rep.report_dir, exist_ok=True)
    _history(rep)
    _importance(rep, space, study)
    _parallel(rep, space)
    _fusions(rep, space)
    _control_arms(rep, space, resamples=resamples, seed=seed)
    with open(rep.summary_path, "w") as f:
        f.write(render_markdown(rep, leaderboard, space))
    return rep


def write_report(experiment_dir: str, *, resamples: int = arms.RESAMPLES, seed: int = arms.SEED) -> str:
    """Write ``EXPERIMENT_DIR/report/`` (PNG plots + ``summary.md``); returns the path of ``summary.md``.

    Raises:
        UserError: not an experiment folder, or a sweep that has not finished.
    """
    return build_report(experiment_dir, resamples=resamples, seed=seed).published_summary


def format_verdicts(rep: Report) -> str:
    """Terminal lines: one per control arm."""
    lines = []
    for a in rep.arms:
        if a.comparison is None:
            lines.append(f"{a.name}: skipped ({a.skipped})")
        else:
            c, ci = a.comparison, a.comparison.ci
            lines.append(f"winner vs {a.name} ({_describe(a.control)}): test accuracy {c.winner_accuracy:.4f} vs "
                         f"{c.control_accuracy:.4f}, difference {ci.difference:+.4f}, {ci.level:.0%} CI "
                         f"[{ci.low:+.4f}, {ci.high:+.4f}]: {c.verdict}")
    return "\n".join(lines)

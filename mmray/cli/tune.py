"""``mmray tune JOB.yaml [--space SPACE.yaml] [--time-budget 20m]``: a Ray Tune + Optuna sweep (without ``--space``
the built-in default space); ``--resume EXPERIMENT_DIR`` finishes one."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "tune", help="sweep hyperparameters with Ray Tune + Optuna and export the best model",
                 example="mmray tune jobs/quickstart.yaml --time-budget 20m\n"
                         "  mmray tune jobs/quickstart.yaml --space search_spaces/fusion.yaml --num-samples 8\n"
                         "  mmray tune --resume runs/quickstart-sweep", run=run)
    p.add_argument("job", metavar="JOB.yaml", nargs="?")
    p.add_argument("--space", metavar="SPACE.yaml",
                   help="what to sweep (default: the built-in space, mmray/tune/default_space.yaml, fitted to the job)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's num_samples; with "
                   "--time-budget, as many as it allows)")
    p.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget of the sweep, e.g. 90s, 20m, 1.5h: "
                   "trials start while it lasts, running ones are stopped at its end (with --num-samples: "
                   "whichever comes first)")
    p.add_argument("--finalists", type=int, metavar="K", help="train the top K trials again with other seeds before "
                   "naming the winner (the best mean wins); 0 = off (default: the space's finalists, 3 in the "
                   "built-in space)")
    p.add_argument("--finalists-cv", type=int, metavar="K", help="score the finalists by K-fold cross-validation "
                   "over train+val instead of re-runs with other seeds (folds stratified by label, seeded; the best "
                   "mean over the folds wins; best/ is the winner's own checkpoint); in-process trials only; "
                   "0 = off (default: the space's finalists_cv, 0)")
    p.add_argument("--ensemble", type=int, metavar="K", help="also export the top K trials as one ensemble "
                   "(probabilities averaged); best/ is the better of it and the single winner on validation; "
                   "0 = off (default: the space's ensemble, 3 in the built-in space)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="experiment name (default: <job name>-sweep, or -2, -3... when that exists)")
    p.add_argument("--storage", help="where experiments go (default: the job's storage, ./runs)")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue a stopped sweep")


def run(args) -> int:
    from mmray.tune.api import tune_job
    from mmray.tune.results import format_summary

    summary = tune_job(args.job, args.space, overrides=args.overrides, num_samples=args.num_samples,
                       time_budget=args.time_budget, finalists=args.finalists, finalists_cv=args.finalists_cv,
                       ensemble=args.ensemble, name=args.name, storage=args.storage, resume=args.resume)
    print()
    print(format_summary(summary))
    return 0

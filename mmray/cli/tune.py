"""``mmray tune JOB.yaml --space SPACE.yaml``: a Ray Tune + Optuna sweep; ``--resume EXPERIMENT_DIR`` finishes one."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "tune", help="sweep hyperparameters with Ray Tune + Optuna and export the best model",
                 example="mmray tune jobs/quickstart.yaml --space search_spaces/fusion.yaml --num-samples 8\n"
                         "  mmray tune --resume runs/quickstart-sweep", run=run)
    p.add_argument("job", metavar="JOB.yaml", nargs="?")
    p.add_argument("--space", metavar="SPACE.yaml")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's num_samples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="experiment name (default: <job name>-sweep, or -2, -3... when that exists)")
    p.add_argument("--storage", help="where experiments go (default: the job's storage, ./runs)")
    p.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue a stopped sweep")


def run(args) -> int:
    from mmray.tune.api import tune_job
    from mmray.tune.results import format_summary

    summary = tune_job(args.job, args.space, overrides=args.overrides, num_samples=args.num_samples,
                       name=args.name, storage=args.storage, resume=args.resume)
    print()
    print(format_summary(summary))
    return 0

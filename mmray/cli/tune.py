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
    from mmray.config.errors import UserError
    from mmray.tune.results import format_summary
    from mmray.tune.sweep import load_setup, prepare, run_sweep

    if args.resume:
        if args.job or args.space:
            raise UserError("--resume takes only EXPERIMENT_DIR: the job and space are read from it")
        setup = load_setup(args.resume)
        summary = run_sweep(setup, resume=True)
    else:
        if not args.job or not args.space:
            raise UserError("give JOB.yaml and --space SPACE.yaml (or --resume EXPERIMENT_DIR)")
        from mmray.config import validate_job
        from mmray.config.loader import apply_overrides, read_yaml
        from mmray.tune.space import load_space

        job_raw = apply_overrides(read_yaml(args.job), args.overrides, warn=True)
        config = validate_job(job_raw, args.job)  # exit 2 on a bad job, before anything starts
        space = load_space(args.space, job_raw, num_samples=args.num_samples)
        setup = prepare(job_raw, space, name=f"{config.name}-sweep" if args.name is None else args.name,
                        storage=args.storage or config.storage, explicit_name=args.name is not None)
        summary = run_sweep(setup)
    print()
    print(format_summary(summary))
    return 0

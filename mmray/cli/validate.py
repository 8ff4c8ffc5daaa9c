"""``mmray validate JOB.yaml [--space SPACE.yaml]``: check a job config (and a sweep space); starts nothing."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "validate",
                 help="check a job config (its dataset, if present, and a sweep space against it); starts nothing",
                 example="mmray validate jobs/quickstart.yaml --space search_spaces/fusion.yaml", run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--space", metavar="SPACE.yaml", help="also check this search space against the job, "
                   "as `mmray tune` does before it starts")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    import os

    from mmray.config import load_job
    from mmray.train.api import absolute_paths, check_dataset, check_model_files

    config = absolute_paths(load_job(args.job, args.overrides))
    check_model_files(config)  # weights files, model folders, tokenizers: from local files, before anything starts
    print(f"{args.job}: ok (job {config.name!r}, fusion {config.model.fusion.name}, "
          f"modalities {', '.join(config.data.modalities)})")
    if args.space:
        from mmray.config.loader import apply_overrides, read_yaml
        from mmray.tune.space import load_space

        job_raw = apply_overrides(read_yaml(args.job), args.overrides)
        space = load_space(args.space, job_raw)  # ConfigError (exit 2) naming parameters.<key>
        trials = space.num_samples if space.num_samples is not None else "as many as the time budget allows"
        print(f"{args.space}: ok ({len(space.parameters)} parameters, {trials} trials, "
              f"searcher {space.search.name}, scheduler {space.scheduler.name})")
    if "://" in config.data.path or os.path.exists(config.data.path):
        info = check_dataset(config)  # UserError (exit 2) if it lacks what the job needs
        rows = ", ".join(f"{split} {s.rows}" for split, s in info.splits.items())
        print(f"dataset {config.data.path}: ok ({rows} rows, {len(info.class_names)} classes)")
    else:
        print(f"dataset {config.data.path}: not found yet (make it with `mmray data synth` or `mmray data prepare`)")
    return 0

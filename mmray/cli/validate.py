"""``mmray validate JOB.yaml``: check a job config; starts nothing."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "validate", help="check a job config (and its dataset, if present); starts nothing",
                 example="mmray validate jobs/quickstart.yaml --set model.fusion.dropout=0.2", run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    import os

    from mmray.config import load_job
    from mmray.train.api import absolute_paths, check_dataset

    config = absolute_paths(load_job(args.job, args.overrides))
    print(f"{args.job}: ok (job {config.name!r}, fusion {config.model.fusion.name}, "
          f"modalities {', '.join(config.data.modalities)})")
    if "://" in config.data.path or os.path.exists(config.data.path):
        info = check_dataset(config)  # UserError (exit 2) if it lacks what the job needs
        rows = ", ".join(f"{split} {s.rows}" for split, s in info.splits.items())
        print(f"dataset {config.data.path}: ok ({rows} rows, {len(info.class_names)} classes)")
    else:
        print(f"dataset {config.data.path}: not found yet (make it with `mmray data synth` or `mmray data prepare`)")
    return 0

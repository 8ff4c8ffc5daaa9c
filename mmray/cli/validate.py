"""``mmray validate JOB.yaml``: check a job config; starts nothing."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "validate", help="check a job config (and its dataset, if present); starts nothing",
                 example="mmray validate jobs/quickstart.yaml --set model.fusion.dropout=0.2", run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from mmray.config import load_job

    config = load_job(args.job, args.overrides)
    print(f"{args.job}: ok (job {config.name!r}, fusion {config.model.fusion.name}, "
          f"modalities {', '.join(config.data.modalities)})")
    return 0

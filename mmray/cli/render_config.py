"""``mmray render-config JOB.yaml``: print the fully resolved config, every default written out."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "render-config", help="print the fully resolved job config (defaults included)",
                 example="mmray render-config jobs/quickstart.yaml --set train.optimizer.lr=3e-4", run=run)
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from mmray.config import load_job, to_yaml

    print(to_yaml(load_job(args.job, args.overrides)), end="")
    return 0

"""``mmray report EXPERIMENT_DIR``: plots and a Markdown summary of a finished sweep, with control arms."""
from __future__ import annotations

from mmray.cli.main import add_verb


def register(sub) -> None:
    p = add_verb(sub, "report", help="write a sweep's report: plots, leaderboard, winner vs control arms (no Ray)",
                 example="mmray report runs/quickstart-sweep", run=run)
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR", help="the folder `mmray tune` wrote")


def run(args) -> int:
    from mmray.tune.report import build_report, format_verdicts

    rep = build_report(args.experiment_dir)
    print(f"report: {rep.published_summary}")
    print(f"plots:  {', '.join(rep.plots.values()) or 'none'} (in {rep.published_dir})")
    print(format_verdicts(rep))
    return 0

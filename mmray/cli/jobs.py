"""``mmray jobs list | status ID | logs ID [--follow] | stop ID``: jobs on a Ray cluster."""
from __future__ import annotations

import argparse
import sys

from mmray.cli.main import _Parser, add_verb
from mmray.cli.submit import add_cluster_flags


def register(sub) -> None:
    p = add_verb(sub, "jobs", help="list, inspect, follow and stop jobs on a Ray cluster",
                 example="mmray jobs list\n  mmray jobs logs raysubmit_AbC123 --follow\n"
                         "  mmray jobs stop raysubmit_AbC123", run=run)
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for name, help_, with_id in (("list", "every job on the cluster, newest first", False),
                                 ("status", "a job's status, entrypoint and times", True),
                                 ("logs", "a job's output so far (--follow: until it ends)", True),
                                 ("stop", "stop a running job and wait until it has stopped", True)):
        a = actions.add_parser(name, help=help_, description=help_,
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=f"example:\n  mmray jobs {name}{' raysubmit_AbC123' if with_id else ''}")
        if with_id:
            a.add_argument("job_id", metavar="ID")
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        add_cluster_flags(a)


def run(args) -> int:
    from mmray.jobs import connect, follow_logs, format_jobs, format_status, job_info, stop

    cluster = connect(args.address, insecure=args.insecure)
    if args.action == "list":
        print(format_jobs(cluster.client.list_jobs()))
        return 0
    info = job_info(cluster, args.job_id)  # an unknown id is exit 2 naming it
    if args.action == "status":
        print(format_status(info))
        return 0
    if args.action == "logs":
        if args.follow:
            status = follow_logs(cluster, args.job_id)
            print(f"\njob {args.job_id}: {status}", file=sys.stderr)
            return 0
        sys.stdout.write(cluster.client.get_job_logs(args.job_id))
        return 0
    status = stop(cluster, args.job_id)
    print(f"job {args.job_id}: {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1

"""``mmray submit [--address URL] [--wait] -- train|tune ARGS...``: run a job on a Ray cluster."""
from __future__ import annotations

import argparse
import sys

from mmray.cli.main import add_verb, build_parser

EXIT_BY_STATUS = {"SUCCEEDED": 0}


def add_cluster_flags(p) -> None:
    p.add_argument("--address", metavar="URL",
                   help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: RAY_ADDRESS, then "
                        "http://127.0.0.1:8265)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a remote cluster without token auth (CVE-2023-48022: anyone who reaches it "
                        "can run code)")


def register(sub) -> None:
    p = add_verb(sub, "submit", help="run `mmray train` or `mmray tune` on a Ray cluster (Ray Jobs API); this "
                                     "folder is uploaded as the job's working directory",
                 example="mmray submit --address http://127.0.0.1:8265 --wait -- train jobs/quickstart.yaml "
                         "--set data.path=/shared/data/synth --storage /shared/runs", run=run)
    add_cluster_flags(p)
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs and exit with its status (0 succeeded, 1 failed or stopped)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- train|tune ARGS...")


def run(args) -> int:
    from mmray.jobs import connect, follow_logs, prepare, submit

    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    spec = prepare(command, parse=build_parser().parse_args)  # a bad verb, flag or config: exit 2, nothing sent
    for w in spec.warnings:
        print(f"mmray: warning: {w}", file=sys.stderr)
    print(f"package:    {spec.package.summary()}", flush=True)
    cluster = connect(args.address, insecure=args.insecure)
    job_id = submit(cluster, spec)
    auth = f"token auth ({cluster.token.source})" if cluster.token else "no auth"
    print(f"job:        {job_id}")
    print(f"runs:       {spec.entrypoint}")
    print(f"dashboard:  {cluster.url}  ({auth})")
    print(f"logs:       mmray jobs logs {job_id} --follow{cluster.address_flag}")
    print(f"stop:       mmray jobs stop {job_id}{cluster.address_flag}")
    if not args.wait:
        return 0
    print(flush=True)
    try:
        status = follow_logs(cluster, job_id)
    except KeyboardInterrupt:
        print(f"\nmmray: stopped following; the job goes on. Stop it with: mmray jobs stop {job_id}"
              f"{cluster.address_flag}", file=sys.stderr)
        return 130
    print(f"\njob {job_id}: {status}")
    return EXIT_BY_STATUS.get(status, 1)

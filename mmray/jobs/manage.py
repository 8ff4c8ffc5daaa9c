"""``mmray jobs``: list, inspect, follow and stop jobs on a cluster's Jobs API."""
from __future__ import annotations

import time
from typing import Any

from mmray.config.errors import UserError
from mmray.jobs.client import Cluster
from mmray.jobs.submit import TERMINAL, wait_for_status


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def job_info(cluster: Cluster, job_id: str) -> Any:
    """Ray's ``JobDetails`` for ``job_id``. Raises :class:`UserError` naming the id when there is no such job."""
    try:
        return cluster.client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"no job {job_id!r} on {cluster.url}; `mmray jobs list` shows the jobs there") from None
        raise


def format_jobs(jobs: list[Any]) -> str:
    """One line per job, newest first: id, status, start, end, entrypoint."""
    if not jobs:
        return "no jobs"
    rows = [("JOB ID", "STATUS", "STARTED", "ENDED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        rows.append((j.submission_id or j.job_id or "-", str(j.status), _when(j.start_time), _when(j.end_time),
                     j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows)


def format_status(info: Any) -> str:
    """``mmray jobs status``'s lines for one job: id, status (and message), entrypoint and times."""
    lines = [f"job:        {info.submission_id or info.job_id}",
             f"status:     {info.status}" + (f"  ({info.message})" if info.message else ""),
             f"entrypoint: {info.entrypoint}",
             f"started:    {_when(info.start_time)}",
             f"ended:      {_when(info.end_time)}"]
    if getattr(info, "driver_node_id", None):
        lines.append(f"driver on:  node {info.driver_node_id}")
    return "\n".join(lines)


def stop(cluster: Cluster, job_id: str, timeout: float = 60) -> str:
    """Ask the job to stop and wait until it has; returns its final status."""
    info = job_info(cluster, job_id)
    if str(info.status) in TERMINAL:
        return str(info.status)
    cluster.client.stop_job(job_id)
    return wait_for_status(cluster, job_id, TERMINAL, timeout=timeout)

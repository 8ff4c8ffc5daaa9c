"""Running mmray on a Ray cluster over the Ray Jobs API: ``submit`` and ``jobs``, with token auth."""
from mmray.jobs.address import find_token, is_loopback
from mmray.jobs.client import Cluster, ClusterUnreachable, connect
from mmray.jobs.manage import format_jobs, format_status, job_info, stop
from mmray.jobs.package import EXCLUDES
from mmray.jobs.submit import JobSpec, follow_logs, prepare, submit

__all__ = ["Cluster", "ClusterUnreachable", "EXCLUDES", "JobSpec", "connect", "find_token", "follow_logs",
           "format_jobs", "format_status", "is_loopback", "job_info", "prepare", "stop", "submit"]

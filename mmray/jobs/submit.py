"""``mmray submit``: run ``mmray train|tune ...`` on a Ray cluster with this folder as its working directory."""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from mmray.config import load_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, read_yaml
from mmray.jobs.client import Cluster
from mmray.runtime import QUIET_ENV
from mmray.tune.space import load_space

VERBS = ("train", "tune")

# Never uploaded: environments, datasets, results, VCS and caches. Anchored ("/data") where a package folder
# of the same name (mmray/data) must still go up. Ray also skips what .gitignore / .rayignore list.
EXCLUDES = (
    "/.venv", "/venv", "/.git", "/data", "/datasets", "/runs", "/build", "/dist",
    "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info", "node_modules",
    ".ipynb_checkpoints",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """What is sent: the command, the runtime env (working dir + excludes), and warnings for the user."""

    entrypoint: str
    runtime_env: dict
    verb: str
    warnings: list[str]


def entrypoint(args: Sequence[str]) -> str:
    """The shell command the cluster runs: ``mmray train|tune ARGS`` (each argument quoted).

    Raises:
        UserError: no verb, or a verb other than train / tune.
    """
    if not args:
        raise UserError("give the command to run after `--`: mmray submit -- train JOB.yaml ...")
    if args[0] not in VERBS:
        raise UserError(f"submit runs `mmray train` or `mmray tune`; got {args[0]!r} (choose one of "
                        f"{', '.join(VERBS)}): mmray submit -- train JOB.yaml ...")
    return shlex.join(["mmray", *args])


def check_command(args: Sequence[str], working_dir: str,
                  parse_args: Callable[[list[str]], argparse.Namespace]) -> list[str]:
    """Validate the job (and space) here before anything is uploaded; returns warnings about paths the
    cluster will not see. Raises :class:`UserError` (exit 2) for a bad flag or config.

    ``parse_args`` is the command line's parser (``mmray.cli.main.build_parser().parse_args``): the library
    checks the arguments exactly as the cluster's ``mmray`` will read them, without importing the CLI."""
    try:
        ns = parse_args(list(args))
    except SystemExit as e:
        if not e.code:  # --help: argparse printed it
            raise
        raise UserError(f"bad arguments for `{shlex.join(['mmray', *args])}` (see above)") from None
    if ns.verb == "tune" and ns.resume:
        return _path_warnings([("--resume", ns.resume)], working_dir)
    old = os.getcwd()
    os.chdir(working_dir)  # the job's relative paths mean the same on the cluster: it runs in this folder
    try:
        if not ns.job:
            raise UserError("give JOB.yaml after the verb: mmray submit -- train JOB.yaml")
        config = load_job(ns.job, ns.overrides)
        if ns.verb == "tune":
            if not ns.space:
                raise UserError("give --space SPACE.yaml: mmray submit -- tune JOB.yaml --space SPACE.yaml")
            load_space(ns.space, apply_overrides(read_yaml(ns.job), ns.overrides), num_samples=ns.num_samples)
    finally:
        os.chdir(old)
    return _path_warnings([("data.path", config.data.path),
                           ("--storage" if ns.storage else "storage", ns.storage or config.storage)],
                          working_dir)


def _path_warnings(paths: list[tuple[str, str]], working_dir: str) -> list[str]:
    from pathlib import Path

    from ray._private.runtime_env.packaging import _get_excludes  # Ray's own matcher: the same decision

    excluded = _get_excludes(Path(working_dir), list(EXCLUDES))
    out = []
    for key, path in paths:
        if "://" in path or os.path.isabs(path):
            continue
        if key in ("--storage", "storage"):
            out.append(f"{key} {path} is relative: on the cluster it is inside the job's temporary working "
                       f"directory, and the run is lost when the job ends; use a folder every node shares or "
                       f"s3://... (--storage /shared/runs)")
        elif excluded(Path(working_dir, path)):
            out.append(f"{key} {path} is not uploaded (datasets never are); use a path every node can read "
                       f"(a shared folder or s3://...)")
    return out


def prepare(args: Sequence[str], *, parse_args: Callable[[list[str]], argparse.Namespace],
            working_dir: str | None = None, env: dict[str, str] | None = None) -> JobSpec:
    """Check ``mmray ARGS`` here (with ``parse_args``, see :func:`check_command`) and describe the job:
    ``working_dir`` (default: the current folder) becomes its working directory on the cluster, without
    :data:`EXCLUDES`.

    Raises:
        UserError: bad verb, flag or config (nothing is contacted or uploaded).
    """
    command = entrypoint(args)
    working_dir = os.path.abspath(working_dir or os.getcwd())
    warnings = check_command(args, working_dir, parse_args)
    runtime_env = {"working_dir": working_dir, "excludes": list(EXCLUDES),
                   "env_vars": {**QUIET_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}}
    return JobSpec(command, runtime_env, args[0], warnings)


def submit(cluster: Cluster, spec: JobSpec) -> str:
    """Submit the job; returns its id (``raysubmit_...``)."""
    return cluster.client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                     metadata={"mmray": spec.verb})


def follow_logs(cluster: Cluster, job_id: str, write: Callable[[str], object] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; returns its final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError:
        pass  # the socket closed early: the status below says how the job ended
    return wait_for_status(cluster, job_id, TERMINAL)


def wait_for_status(cluster: Cluster, job_id: str, wanted: Sequence[str], timeout: float = 3600) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(cluster.client.get_job_status(job_id))
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.5)

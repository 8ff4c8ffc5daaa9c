"""``mmray submit``: run ``mmray train|tune ...`` on a Ray cluster with this folder as its working directory.

What goes up is decided file by file in :mod:`mmray.jobs.package` (no secrets, nothing ignored, a size limit)
and staged; the auth token travels only in the request header, never in the job spec.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mmray.config import load_job
from mmray.config.errors import UserError
from mmray.config.loader import apply_overrides, read_yaml
from mmray.config.schema import check_run_name
from mmray.jobs.client import Cluster
from mmray.jobs.package import Package, package_files, stage
from mmray.runtime import QUIET_ENV
from mmray.tune.space import load_space

VERBS = ("train", "tune")
# Environment variables a job spec never carries: anyone who can list the cluster's jobs reads the spec.
TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """What is sent: the command, the runtime env (environment variables; the working dir is the staged
    :attr:`package`), and warnings for the user."""

    entrypoint: str
    runtime_env: dict
    verb: str
    warnings: list[str]
    package: Package


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


def check_command(ns: Any, working_dir: str) -> list[tuple[str, str]]:
    """Validate the job (and space) here before anything is uploaded; returns the ``(key, path)`` pairs the
    cluster must see (data, storage). ``ns``: ``mmray train|tune ARGS`` as the CLI's parser parsed them.
    Relative files are read from ``working_dir``, where the job runs on the cluster.

    Raises:
        UserError: a bad flag, config or space (exit 2).
    """
    if ns.verb == "tune" and ns.resume:
        return [("--resume", ns.resume)]

    def here(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(working_dir, path)

    if not ns.job:
        raise UserError("give JOB.yaml after the verb: mmray submit -- train JOB.yaml")
    config = load_job(here(ns.job), ns.overrides)
    if ns.name is not None:
        check_run_name(ns.name, "--name")  # one path component, as `mmray train|tune` will insist
    if ns.verb == "tune":
        # no --space: the built-in default space, fitted to the job
        load_space(here(ns.space) if ns.space else None, apply_overrides(read_yaml(here(ns.job)), ns.overrides),
                   num_samples=ns.num_samples, time_budget=ns.time_budget, finalists=ns.finalists,
                   ensemble=ns.ensemble, finalists_cv=ns.finalists_cv)
    return [("data.path", config.data.path), ("--storage" if ns.storage else "storage", ns.storage or config.storage)]


def _path_warnings(paths: list[tuple[str, str]], package: Package) -> list[str]:
    out = []
    for key, path in paths:
        if "://" in path or os.path.isabs(path):
            continue
        if key in ("--storage", "storage"):
            out.append(f"{key} {path} is relative: on the cluster it is inside the job's temporary working "
                       f"directory, and the run is lost when the job ends; use a folder every node shares or "
                       f"s3://... (--storage /shared/runs)")
        elif not _uploaded(os.path.normpath(path).replace(os.sep, "/"), package):
            out.append(f"{key} {path} is not uploaded (datasets never are); use a path every node can read "
                       f"(a shared folder or s3://...)")
    return out


def _uploaded(rel: str, package: Package) -> bool:
    return any(f == rel or f.startswith(rel.rstrip("/") + "/") for f, _ in package.files)


def prepare(args: Sequence[str], *, parse: Callable[[list[str]], Any], working_dir: str | None = None,
            env: dict[str, str] | None = None) -> JobSpec:
    """Check ``mmray ARGS`` here and describe the job: the files of ``working_dir`` (default: the current
    folder) that :func:`~mmray.jobs.package.package_files` keeps become its working directory on the cluster.

    ``parse``: the CLI's argument parser (``build_parser().parse_args``), so each verb's flags are declared
    once, in :mod:`mmray.cli`.

    Raises:
        UserError: bad verb, flag or config; ``env`` names an auth-token variable; the package is too large
            (nothing is contacted or uploaded).
    """
    command = entrypoint(args)
    working_dir = os.path.abspath(working_dir or os.getcwd())
    try:
        ns = parse(list(args))
    except SystemExit as e:
        if not e.code:  # --help: argparse printed it
            raise
        raise UserError(f"bad arguments for `{shlex.join(['mmray', *args])}` (see above)") from None
    paths = check_command(ns, working_dir)
    token_vars = sorted(set(env or {}) & set(TOKEN_VARS))
    if token_vars:
        raise UserError(f"{', '.join(token_vars)} would be stored in the job spec, where anyone who can list the "
                        "cluster's jobs reads it; the token is sent in the request header only")
    package = package_files(working_dir)

    runtime_env = {"env_vars": {**QUIET_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}}
    return JobSpec(command, runtime_env, args[0], _path_warnings(paths, package), package)


def request(spec: JobSpec, working_dir: str) -> dict:
    """The arguments of the Jobs API submission (``working_dir``: the staged package)."""
    return {"entrypoint": spec.entrypoint, "runtime_env": {**spec.runtime_env, "working_dir": working_dir},
            "metadata": {"mmray": spec.verb}}


def submit(cluster: Cluster, spec: JobSpec) -> str:
    """Stage the package, submit the job, delete the staged copy; returns the job's id (``raysubmit_...``).

    Raises:
        UserError: the cluster's token appears in the job spec (it must only ever be in the header).
    """
    staged = stage(spec.package)
    try:
        body = request(spec, staged)
        if cluster.token is not None and cluster.token.value in json.dumps(body):
            raise UserError("the cluster's auth token appears in the job spec (the command or an environment "
                            "variable), where anyone who can list jobs reads it; remove it: the token is sent "
                            "in the request header only")
        return cluster.client.submit_job(**body)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


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

"""Storage for tests: a real S3 API on loopback (the ``moto`` server) and a folder nobody can write to.

Import a fixture into a test module (``from storage_fixtures import s3_bucket``). ``s3_bucket`` points
the usual AWS environment variables at the server for the test's process and every process started
after it (Ray workers included), creates an empty bucket and yields ``s3://<bucket>``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from helpers import HANG_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3():
    """A ``moto`` S3 server on loopback for the ``with`` block: the AWS environment variables point at it (for
    this process and every process started inside the block, Ray workers included), with an empty bucket;
    yields ``s3://<bucket>``. Also used by benchmarks as a local stand-in for object storage."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + HANG_S
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "moto server exited"
                assert time.time() < deadline, f"moto server did not start within {HANG_S} s"
                time.sleep(0.2)
        bucket = f"mmray-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_bucket():
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    with moto_s3() as bucket:
        yield bucket


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to, root included (chmod, plus the immutable flag when running as root)."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:  # root ignores permission bits
        immutable = shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)]).returncode == 0
        if not immutable:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
    yield str(path)
    if immutable:
        subprocess.run(["chattr", "-i", str(path)])
    path.chmod(0o755)

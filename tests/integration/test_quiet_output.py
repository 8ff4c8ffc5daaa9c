"""What a user reads from a real ``mmray train`` on a fresh local Ray: mmray's own lines only, none of Ray's
(Ray Data's actor lines while the decoded-input cache is built, Ray Train's placement-group cleaner at the end, even
with a second Ray running on the host). ``--verbose`` keeping Ray's lines: tests/unit/test_runtime.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job

from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

# mmray's own lines: its progress ("mmray epoch=..."), the plans' lines, the measurement of the exported epoch and
# the summary block after the run
OWN = ("mmray", "embedding cache:", "decoded-input cache:", "measuring epoch", "run:", "best epoch:", "export:",
       "tensorboard:", "evaluate:")


def _not_mmrays(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip() and not line.startswith(OWN)]


def _train(tmp_path) -> subprocess.CompletedProcess:
    data = str(tmp_path / "synth")
    synth(data, rows=120, shards=2, seed=0)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="q", epochs=2, workers=1).model_dump(mode="json")))
    return subprocess.run([sys.executable, "-m", "mmray.cli.main", "train", str(job), "--storage",
                           str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=HANG_S)


@pytest.fixture
def second_ray(tmp_path):
    """Another Ray on the host (as when two runs overlap): Ray's address lookups without an address then fail."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_train_prints_only_mmrays_lines(tmp_path, second_ray):
    done = _train(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "decoded-input cache: used (built" in done.stdout, done.stdout  # the cache build ran on Ray Data
    assert _not_mmrays(done.stdout) == [], done.stdout
    assert "Exception in thread" not in done.stdout


"""A run or experiment folder is held by one process: a second is refused naming the holder; a dead
holder's lock is taken over. The holder here is a real second process; the test waits on its signal."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import small_job

from mmray import storage as store
from mmray.cli.main import main
from mmray.config.errors import UserError
from mmray.data.synth import synth

HOLD = """
import sys
from mmray import storage
with storage.folder_lock(sys.argv[1], what=sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""


@pytest.fixture
def holder():
    """Start a process holding a folder's lock; returns it once it says it holds it."""
    procs = []

    def start(folder: str, what: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        p = subprocess.Popen([sys.executable, "-c", HOLD, folder, what], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"  # blocks until the lock is held: an event, not a delay
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_second_holder_is_refused_naming_the_pid_and_host(tmp_path, holder):
    folder = str(tmp_path / "runs" / "x")
    p = holder(folder, "run")
    with pytest.raises(UserError) as e:
        with store.folder_lock(folder, what="run"):
            pass
    assert f"run {folder} is in use by pid {p.pid} on host {socket.gethostname()}" in str(e.value)
    p.stdin.close()  # the holder ends normally: its lock file goes with it
    p.wait()
    assert not os.path.exists(os.path.join(folder, store.LOCK_FILE))
    with store.folder_lock(folder, what="run", say=pytest.fail):  # free now, and nothing to take over
        pass


def test_a_killed_holders_lock_is_taken_over_with_a_message(tmp_path, holder):
    folder = str(tmp_path / "x")
    p = holder(folder, "experiment")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert os.path.exists(os.path.join(folder, store.LOCK_FILE))  # left behind
    said = []
    with store.folder_lock(folder, what="experiment", say=said.append):
        assert len(said) == 1 and f"taking over the lock of pid {p.pid}" in said[0]
        assert "no longer running" in said[0]


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    synth(str(root / "synth"), rows=60, shards=1, seed=0)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(str(root / "synth"), workers=1).model_dump(mode="json")))
    return str(job)


def test_train_into_a_run_in_use_exits_2_before_ray_starts(job_file, tmp_path, holder, capsys):
    storage = tmp_path / "runs"
    p = holder(str(storage / "same"), "run")
    assert main(["train", job_file, "--name", "same", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert f"mmray: run {storage / 'same'} is in use by pid {p.pid}" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_tune_into_an_experiment_in_use_exits_2_before_ray_starts(job_file, tmp_path, holder, capsys):
    from mmray.tune.experiment import load_setup, prepare
    from mmray.tune.space import load_space
    from mmray.tune.sweep import run_sweep

    job_raw = yaml.safe_load(open(job_file))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"metric": "val.accuracy", "mode": "max", "num_samples": 1,
                                          "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}))
    setup = prepare(job_raw, load_space(str(space_file), job_raw), name="sw", storage=str(tmp_path))
    p = holder(setup.experiment_dir, "experiment")
    for attempt in (lambda: run_sweep(load_setup(setup.experiment_dir), resume=True),
                    lambda: prepare(job_raw, load_space(str(space_file), job_raw), name="sw", storage=str(tmp_path))):
        with pytest.raises(UserError, match=f"experiment {setup.experiment_dir} is in use by pid {p.pid}"):
            attempt()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()

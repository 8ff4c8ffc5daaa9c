"""A Ray Train worker SIGKILLed mid-run (``train.max_failures: 1``): the run restarts from its checkpoint and
the user reads one line about it, not Ray's 20-line ``ActorDiedError`` traceback (which stays in Ray's logs)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job, train_workers, wait_for_registered_checkpoint

from mmray.data.synth import synth
from mmray.train.checkpoint import is_complete

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.parametrize("upload", ["sync", "background"])
def test_a_killed_worker_is_one_line_and_the_run_finishes(tmp_path, upload):
    """``background``: every checkpoint is uploaded while the next epoch trains (``async_upload_mb: 0``);
    the restart resumes from the last one stored, like the synchronous path, and none is lost at the end."""
    data = str(tmp_path / "synth")
    synth(data, rows=600, shards=2, seed=0)
    job = tmp_path / "job.yaml"
    config = small_job(data, name="k", epochs=3, workers=1, batch_size=8, max_failures=1)
    # every epoch's checkpoint stays (num_to_keep 5): each one reported must be there at the end
    config = config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={
        "num_to_keep": 5, "async_upload_mb": 0 if upload == "background" else None})})
    job.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    snapshot = tmp_path / "runs" / "k" / "checkpoint_manager_snapshot.json"
    proc = subprocess.Popen([sys.executable, "-m", "mmray.cli.main", "train", str(job), "--storage",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    killed = None
    try:
        # the event: Ray has registered epoch 1's checkpoint (so the restart has something to resume from)
        wait_for_registered_checkpoint(snapshot.parent, 1,
                                       lambda: proc.stdout.read() if proc.poll() is not None else None)
        workers = train_workers(proc.pid)
        assert len(workers) == 1, workers
        killed = workers[0]
        os.kill(killed, signal.SIGKILL)
        out, _ = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    lines = [ln for ln in out.splitlines() if "died" in ln]
    assert len(lines) == 1, out
    assert re.match(rf"worker 0 died \(killed, out of memory or crashed; pid {killed}\); restarting from epoch "
                    r"\d's checkpoint, failure 1 of 1 \(Ray's full report: .*logs/train\)$", lines[0]), lines[0]
    assert "ActorDiedError" not in out and "A worker died or was killed" not in out, out
    # The kill lands once epoch 1's checkpoint is registered; epoch 2 may have finished by then without its
    # checkpoint being registered, and is trained again after the restart. Progress after the line starts
    # after the epoch it names; the run's history still holds each epoch once.
    restart = int(re.search(r"restarting from epoch (\d)'s checkpoint", lines[0]).group(1))
    after = out.split(lines[0], 1)[1]
    assert [int(n) for n in re.findall(r"^mmray epoch=(\d+)/", after, re.M)] == list(range(restart + 1, 4)), out
    with open(tmp_path / "runs" / "k" / "metrics.jsonl") as f:
        assert [int(json.loads(line)["epoch"]) for line in f] == [1, 2, 3]
    # every checkpoint reported is stored whole and registered: the last upload was waited for
    assert sorted(p.name for p in (tmp_path / "runs" / "k").glob("checkpoint_epoch_*")) == [
        f"checkpoint_epoch_000{e}" for e in (1, 2, 3)]
    assert all(is_complete(str(tmp_path / "runs" / "k" / f"checkpoint_epoch_000{e}")) for e in (1, 2, 3))
    assert "checkpoint_epoch_0003" in snapshot.read_text()
    assert not list((tmp_path / "runs" / "k").glob(".tmp-*"))

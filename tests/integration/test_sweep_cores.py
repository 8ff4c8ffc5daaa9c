"""A real local sweep: when one of two in-process trials ends, the other takes the cores it leaves."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]
EPOCHS, JOB_LR = 4, 3e-3

# `mmray tune` with each trial's loop context gated on files, so the order of events is fixed however busy
# the machine is: the baseline trial ("long") reads its first epoch's share while the other trial ("short")
# has not finished (short waits for that), and reads its later shares only after short has finished and the
# driver has given it short's core (long waits for that, up to a deadline: a sweep that never gives it the
# core fails the assertions below, it does not hang).
GATED_TUNE = """
import os, sys, time
import torch
import mmray.tune.sweep as sweep
from mmray.cli.main import main
from mmray.tune.context import TuneTrialContext

GATES, JOB_LR, CPUS = {gates!r}, {lr!r}, {cpus!r}

def touch(name):
    open(os.path.join(GATES, name), "w").close()

def wait_for(name):
    while not os.path.exists(os.path.join(GATES, name)):
        time.sleep(0.05)

class GatedContext(TuneTrialContext):
    def __init__(self, config, run_dir, **kwargs):
        super().__init__(config, run_dir, **kwargs)
        self.long = config.train.optimizer.lr == JOB_LR  # the baseline trial: the job as is

    def train_batches(self, epoch):
        if self.long and epoch > 1:
            wait_for("short-done")
            deadline = time.monotonic() + {hang}
            while self.cores.share() != CPUS and time.monotonic() < deadline:
                time.sleep(0.05)
        if not self.long and epoch == 1:
            wait_for("long-epoch-1")
        batches = super().train_batches(epoch)
        if self.long and epoch == 1:
            touch("long-epoch-1")
        return batches

    def report(self, metrics, checkpoint_dir):
        super().report({{**metrics, "torch_threads": float(torch.get_num_threads())}}, checkpoint_dir)
        if not self.long and metrics["epoch"] == {epochs}:
            touch("short-done")

real_run_trial = sweep._run_trial
def _run_trial(params, **kwargs):  # same name: the trial folders are named after it
    return real_run_trial(params, context_class=GatedContext, **kwargs)
sweep._run_trial = _run_trial
sys.exit(main(sys.argv[1:]))
"""


def trial_results(exp: str) -> dict[str, list[dict]]:
    out = {}
    for path in glob.glob(os.path.join(exp, "_run_trial_*", "result.json")):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        out[rows[0]["config"]["train.optimizer.lr"]] = rows
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores: two trials, then one with both")
def test_the_last_trial_takes_the_cores_the_finished_one_leaves(tmp_path):
    cpus = os.cpu_count()
    data = str(tmp_path / "synth")
    synth(data, rows=200, shards=1, seed=5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="cores", epochs=EPOCHS, workers=1, batch_size=32)
                                  .model_dump(mode="json")))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 2, "baseline": True, "max_concurrent_trials": 2,
        "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 3e-3]}},  # never exactly the job's
    }))
    gates = tmp_path / "gates"
    gates.mkdir()
    script = tmp_path / "gated_tune.py"
    script.write_text(GATED_TUNE.format(gates=str(gates), lr=JOB_LR, cpus=cpus, epochs=EPOCHS, hang=HANG_S))
    proc = subprocess.run([sys.executable, str(script), "tune", str(job), "--space", str(space),
                           "--storage", str(tmp_path / "runs"), "--name", "exp"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = str(tmp_path / "runs" / "exp")

    results = trial_results(exp)
    assert len(results) == 2
    long = results[JOB_LR]
    (short,) = [rows for lr, rows in results.items() if lr != JOB_LR]
    assert [r["epoch"] for r in long] == [r["epoch"] for r in short] == list(range(1, EPOCHS + 1))
    assert [r["cpu_share"] for r in short] == [1] * EPOCHS  # the long trial ran all along
    assert long[0]["cpu_share"] == 1  # the short trial was still to finish
    assert [r["cpu_share"] for r in long[1:]] == [cpus] * (EPOCHS - 1)  # after it: every core
    assert [r["torch_threads"] for r in long] == [r["cpu_share"] for r in long]  # followed with set_num_threads

    record = json.load(open(os.path.join(exp, "cores.json")))
    assert record["cpus"] == cpus and 0 < record["busy_fraction"] <= 1
    assert f"cores busy:  {record['busy_fraction']:.0%} of {cpus} CPUs" in proc.stdout

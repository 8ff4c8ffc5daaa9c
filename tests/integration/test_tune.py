"""``mmray tune`` on a real local Ray: ASHA stops trials, ranking by best epoch, best/ export, HParams, resume."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from helpers import HANG_S, small_job

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]
EPOCHS = 4
SWEPT = {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "model.fusion.dropout": {"uniform": [0.0, 0.4]}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = str(root / "synth")
    synth(data, rows=400, shards=2, seed=4)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="sweep", epochs=EPOCHS, workers=1, batch_size=32)
                                  .model_dump(mode="json")))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 6, "baseline": True,
        "search": {"name": "optuna_tpe", "n_startup_trials": 3, "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "parameters": {key: SWEPT[key] for key in SWEPT},
    }))
    return str(job), str(space), root


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmray.cli.main", "tune", *args]


@pytest.fixture(scope="module")
def sweep(files):
    job, space, root = files
    proc = subprocess.run(tune_cmd(job, "--space", space, "--storage", str(root / "runs"), "--name", "exp"),
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(root / "runs" / "exp"), proc.stdout


def leaderboard(exp: str) -> list[dict]:
    with open(os.path.join(exp, "leaderboard.csv")) as f:
        return list(csv.DictReader(f))


def test_asha_stops_some_trials_early(sweep):
    rows = leaderboard(sweep[0])
    assert len(rows) == 6
    assert any(r["status"] == "stopped" and int(r["epochs_run"]) < EPOCHS for r in rows)
    assert any(r["status"] == "completed" and int(r["epochs_run"]) == EPOCHS for r in rows)


def test_captured_output_has_one_line_per_trial_event_and_no_ray_table(sweep):
    exp, stdout = sweep
    rows = leaderboard(exp)
    lines = stdout.splitlines()
    for r in rows:
        (started,) = [line for line in lines if line.startswith(f"mmray trial {r['trial_id']} started: ")]
        assert f"optimizer.lr={float(r['train.optimizer.lr']):.3g}" in started and "fusion.dropout=" in started
        if r["status"] == "stopped":
            assert f"mmray trial {r['trial_id']} stopped by ASHA at epoch {r['epochs_run']}: best val.accuracy" in stdout
        else:
            assert f"mmray trial {r['trial_id']} completed {EPOCHS} epochs: best val.accuracy" in stdout
    assert "mmray sweep: 6/6 trials done" in stdout
    for ray_table in ("== Status ==", "Trial status:", "| Trial name", "+----", "Current time:"):
        assert ray_table not in stdout


def test_the_first_trial_is_the_job_as_is_and_is_never_stopped_early(files, sweep):
    import glob

    exp, stdout = sweep
    job = yaml.safe_load(open(files[0]))
    (base,) = [r for r in leaderboard(exp) if r["role"] == "baseline"]
    assert float(base["train.optimizer.lr"]) == job["train"]["optimizer"]["lr"]
    assert float(base["model.fusion.dropout"]) == job["model"]["fusion"]["dropout"]
    assert base["status"] == "completed" and int(base["epochs_run"]) == EPOCHS  # ASHA may not stop the control
    assert glob.glob(os.path.join(exp, f"_run_trial_{base['trial_id']}_1_*"))  # Tune's first trial
    assert f"baseline:    trial {base['trial_id']} (the job as is)" in stdout or "the winner is the baseline" in stdout


def test_leaderboard_ranks_by_each_trials_best_epoch(sweep):
    rows = leaderboard(sweep[0])
    best = [float(r["val.accuracy"]) for r in rows]
    assert best == sorted(best, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert all(1 <= int(r["best_epoch"]) <= int(r["epochs_run"]) for r in rows)


def test_best_export_is_the_winners_best_epoch_and_predicts(sweep):
    import mmray
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.export.evaluate import evaluate

    exp, stdout = sweep
    winner = leaderboard(exp)[0]
    metrics = yaml.safe_load(open(os.path.join(exp, "best", "metrics.json")))
    assert metrics["epoch"] == int(winner["best_epoch"])
    assert metrics["val.accuracy"] == pytest.approx(float(winner["val.accuracy"]), abs=0.02)  # same rows, 1 worker
    model = mmray.load_model(os.path.join(exp, "best"))
    assert model.config.train.optimizer.lr == pytest.approx(float(winner["train.optimizer.lr"]))
    data = model.config.data.path
    assert evaluate(os.path.join(exp, "best"), data, split="test")["accuracy"] == pytest.approx(metrics["test.accuracy"])
    assert read_dataset_info(data).class_names == tuple(model.class_names)
    assert f"best trial:  {winner['trial_id']}" in stdout and "tensorboard --logdir" in stdout


def test_every_trial_has_scalars_and_hparams_in_tensorboard(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    exp = sweep[0]
    for row in leaderboard(exp):
        acc = EventAccumulator(os.path.join(exp, "trials", row["trial_id"], "tensorboard"))
        acc.Reload()
        assert "val/accuracy" in acc.Tags()["scalars"]
        assert "best/val.accuracy" in acc.Tags()["scalars"]
        content = acc.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert set(start.hparams) == set(SWEPT)  # the trial's own parameters, as the HParams tab shows them
        assert start.hparams["train.optimizer.lr"].number_value == pytest.approx(float(row["train.optimizer.lr"]))
        experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert "best/val.accuracy" in {m.name.tag for m in experiment.metric_infos}


def test_optuna_study_is_stored_in_the_experiment(sweep):
    exp = sweep[0]
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{os.path.join(exp, 'optuna.db')}")
    assert len(study.trials) == 6


def terminated_in_snapshot(exp: str) -> set[str]:
    """Trial ids Tune's last experiment snapshot records as finished."""
    import glob
    import json

    ids = set()
    for path in glob.glob(os.path.join(exp, "experiment_state-*.json")):
        try:
            for trial_json, _ in json.load(open(path))["trial_data"]:
                trial = json.loads(trial_json)
                if trial["status"] == "TERMINATED":
                    ids.add(trial["trial_id"])
        except (ValueError, KeyError, OSError):
            pass  # being written
    return ids


def last_checkpoint_index(exp: str, trial_id: str) -> int:
    import glob

    found = glob.glob(os.path.join(exp, f"*_{trial_id}_*", "checkpoint_*"))
    return max(int(p.rsplit("_", 1)[1]) for p in found)


# Runs `mmray tune` with one extra Tune callback: once Tune's experiment snapshot in storage records two
# finished trials (TUNE_GLOBAL_CHECKPOINT_S=0: a snapshot every controller step), the driver writes a
# marker file and blocks. The test kills it then: the kill always lands mid-sweep, at a point where the
# snapshot a resume reads already holds two finished trials, however busy the machine is.
PAUSING_TUNE = """
import glob, json, os, sys, threading
import ray.tune
from mmray.cli.main import main

def terminated(exp):
    ids = set()
    for path in glob.glob(os.path.join(exp, "experiment_state-*.json")):
        try:
            ids |= {t["trial_id"] for t in (json.loads(j) for j, _ in json.load(open(path))["trial_data"])
                    if t["status"] == "TERMINATED"}
        except (ValueError, KeyError, OSError):
            pass  # being written
    return ids

class PauseAfterTwo(ray.tune.Callback):
    def on_step_end(self, iteration, trials, **info):
        marker = os.environ.get("PAUSE_MARKER")  # unset in the resumed process, which unpickles this callback
        if marker and len(terminated(os.environ["PAUSE_EXPERIMENT"])) >= 2:
            open(marker, "w").close()
            threading.Event().wait()

tuner_init = ray.tune.Tuner.__init__
def init(self, *args, run_config=None, **kwargs):
    run_config.callbacks = [*(run_config.callbacks or []), PauseAfterTwo()]
    tuner_init(self, *args, run_config=run_config, **kwargs)
ray.tune.Tuner.__init__ = init
sys.exit(main(sys.argv[1:]))
"""


def test_killed_sweep_resumes_without_rerunning_finished_trials(files):
    job, space, root = files
    storage = str(root / "resume-runs")
    exp = os.path.join(storage, "exp")
    marker = root / "paused"
    script = root / "pausing_tune.py"
    script.write_text(PAUSING_TUNE)
    env = {**os.environ, "PAUSE_MARKER": str(marker), "PAUSE_EXPERIMENT": exp, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    first = subprocess.Popen([sys.executable, str(script), "tune", job, "--space", space, "--storage", storage,
                              "--name", "exp"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        while not marker.exists():  # the driver blocks once it has written the marker: no race after this
            assert first.poll() is None, "the sweep ended before it paused"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = {t: last_checkpoint_index(exp, t) for t in terminated_in_snapshot(exp)}
    assert not os.path.exists(os.path.join(exp, "leaderboard.csv"))

    second = subprocess.run(tune_cmd("--resume", exp), capture_output=True, text=True, timeout=HANG_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = leaderboard(exp)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6  # the searcher's count and history kept
    assert all(r["status"] in ("completed", "stopped") for r in rows)
    for trial_id, index in finished.items():  # finished trials trained no further epoch
        assert last_checkpoint_index(exp, trial_id) == index
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{os.path.join(exp, 'optuna.db')}")
    assert len(study.trials) == 6
    assert os.path.isfile(os.path.join(exp, "best", "model.safetensors"))

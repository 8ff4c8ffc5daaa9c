"""``mmray report`` on a real (tiny) sweep: plots, the leaderboard, and the winner vs a single-modality control arm."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job
from PIL import Image
from storage_fixtures import s3_bucket  # noqa: F401 - a fixture

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SPACE = {
    "metric": "val.accuracy", "num_samples": 4,
    # all four trials drawn at random (seeded); ASHA stops nothing before epoch 2
    "search": {"name": "optuna_tpe", "n_startup_trials": 4, "seed": 0},
    "scheduler": {"name": "asha", "grace_period": 2},
    "parameters": {"data.modalities": {"choice": [["audio", "image", "text"], ["image"]]},
                   "train.optimizer.lr": {"loguniform": [1e-3, 1e-2]}},
}


AUTO: dict = {}  # the report the sweep wrote when it ended


def mmray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmray.cli.main", *args], capture_output=True, text=True, timeout=HANG_S)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = str(root / "synth")
    synth(data, rows=300, shards=1, seed=4)
    job, space = root / "job.yaml", root / "space.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="rep", epochs=2, workers=1, batch_size=32)
                                  .model_dump(mode="json")))
    space.write_text(yaml.safe_dump(SPACE))
    checked = mmray("validate", str(job))
    assert checked.returncode == 0, checked.stderr
    proc = mmray("tune", str(job), "--space", str(space), "--storage", str(root / "runs"), "--name", "exp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = str(root / "runs" / "exp")
    # what the sweep wrote by itself, before `mmray report` below rewrites it
    AUTO["stdout"] = proc.stdout
    AUTO["files"] = sorted(os.listdir(os.path.join(exp, "report")))
    with open(os.path.join(exp, "report", "summary.md")) as f:
        AUTO["summary"] = f.read()
    return exp


@pytest.fixture(scope="module")
def report(experiment):
    proc = mmray("report", experiment)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(experiment, "report", "summary.md")) as f:
        return proc.stdout, f.read()


def test_the_stored_space_reloads_and_every_trial_drew_one_of_its_modality_choices(experiment):
    import csv

    from mmray.config.loader import read_yaml
    from mmray.tune.space import load_space

    space = load_space(os.path.join(experiment, "space.yaml"), read_yaml(os.path.join(experiment, "job.yaml")))
    choices = dict(space.ordered_parameters())["data.modalities"].choice
    assert choices == SPACE["parameters"]["data.modalities"]["choice"]
    with open(os.path.join(experiment, "leaderboard.csv")) as f:
        drawn = [row["data.modalities"] for row in csv.DictReader(f)]
    assert len(drawn) == SPACE["num_samples"]
    assert set(drawn) <= {str(c) for c in choices}, drawn


def test_plots_are_valid_pngs_referenced_by_the_summary(experiment, report):
    _, summary = report
    for name in ("history.png", "importance.png", "parallel.png", "control_arms.png"):
        path = os.path.join(experiment, "report", name)
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
        assert f"]({name})" in summary
    assert not os.path.exists(os.path.join(experiment, "report", "fusions.png"))
    assert "does not vary `model.fusion.name`" in summary


def test_summary_compares_the_winner_with_the_best_single_modality_trial(report):
    stdout, summary = report
    assert "## Control arms" in summary and "best single-modality trial" in summary
    assert "95% CI" in summary and ("excludes 0" in summary or "not distinguishable" in summary)
    assert "best concat trial: skipped; the winner is itself a concat trial" in summary
    assert "winner vs best single-modality trial" in stdout and "95% CI [" in stdout


def test_summary_has_the_leaderboard_winner_and_commands(experiment, report):
    _, summary = report
    assert "## Leaderboard (top 10)" in summary and summary.count("| completed |") + summary.count("| stopped |") == 4
    assert "| train.optimizer.lr |" in summary  # the winner's parameters
    assert f"tensorboard --logdir {experiment}" in summary
    assert f"optuna-dashboard sqlite:///{os.path.join(experiment, 'optuna.db')}" in summary


def test_the_sweep_writes_its_report_when_it_ends(experiment, report):
    assert {"summary.md", "history.png", "control_arms.png"} <= set(AUTO["files"])
    assert AUTO["summary"] == report[1]  # the same report `mmray report` writes
    assert f"report:      {os.path.join(experiment, 'report', 'summary.md')}" in AUTO["stdout"]
    assert "winner vs best single-modality trial" in AUTO["stdout"] or "single-modality trial: skipped" in AUTO["stdout"]


def test_an_experiment_in_s3_gets_the_same_report_there_without_downloading_every_checkpoint(
        experiment, report, s3_bucket, monkeypatch):
    """The experiment copied to a real S3 API (moto on loopback): `mmray report s3://...` writes report/ there,
    with the same verdicts as the local report, and fetches only the two checkpoints the control arm compares."""
    from mmray import storage as store

    uri = store.join(s3_bucket, "sweeps", "exp")
    store.upload(experiment, uri)
    store.remove(store.join(uri, "report"))  # the report below is written from scratch
    proc = mmray("report", uri)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {uri}/report/summary.md" in proc.stdout
    summary = store.read_text(store.join(uri, "report", "summary.md"))
    assert f"- experiment: `{uri}`" in summary and f"tensorboard --logdir {uri}" in summary
    local_verdicts = [line for line in report[0].splitlines() if line.startswith("winner vs")]
    assert local_verdicts and local_verdicts == [l for l in proc.stdout.splitlines() if l.startswith("winner vs")]
    assert {"history.png", "control_arms.png"} <= set(store.listdir(store.join(uri, "report")))

    # Only what the control arm compares is fetched from the checkpoints (two folders), nothing else of theirs.
    fetched = []
    real_download = store.download
    monkeypatch.setattr(store, "download", lambda src, dst: fetched.append(src) or real_download(src, dst))
    from mmray.tune.report import build_report

    build_report(uri)
    assert len(fetched) == 2 and all("/checkpoint_" in f for f in fetched), fetched

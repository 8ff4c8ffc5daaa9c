"""Finalists checked twice and the ensemble arm on a real local Ray: `mmray tune --finalists 2 --ensemble 2` trains
the top two again with another seed (the leaderboard and summary show mean and sd, the winner is the best mean),
then exports the top two as one ensemble next to the single winner, and best/ is the better on validation."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_finalists_are_rechecked_the_best_mean_wins_and_an_ensemble_is_weighed_against_it(tmp_path):
    data = str(tmp_path / "synth")
    synth(data, rows=300, shards=1, seed=5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="fin", epochs=2, workers=1, batch_size=32)
                                  .model_dump(mode="json")))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 3, "finalist_seeds": 1,
        "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]}}}))
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "tune", str(job), "--space", str(space),
                           "--finalists", "2", "--ensemble", "2", "--storage", str(tmp_path / "runs"), "--name", "exp"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "exp"
    rows = list(csv.DictReader(open(exp / "leaderboard.csv")))
    checked = [r for r in rows if r["runs"] == "2"]
    assert len(checked) == 2 and [r["rank"] for r in checked] == ["1", "2"]  # the finalists, by their mean
    means = [float(r["val.accuracy.mean"]) for r in checked]
    assert means == sorted(means, reverse=True)
    assert all(float(r["val.accuracy.sd"]) >= 0 for r in checked)
    assert rows[2]["runs"] == "1" and rows[2]["val.accuracy.mean"] == ""
    assert "finalists:   the top 2 trained again with other seeds" in proc.stdout
    assert f"best trial:  {checked[0]['trial_id']}" in proc.stdout
    assert len(os.listdir(exp / "finalists")) > 0  # the re-runs' own Tune experiment
    summary = (exp / "report" / "summary.md").read_text()
    assert "val.accuracy mean ± sd (runs)" in summary
    # the ensemble arm: both exports kept, best/ is the better on validation, the test CI is reported
    import json

    import mmray

    arm = json.loads((exp / "ensemble-arm.json").read_text())
    assert arm["members"] == [r["trial_id"] for r in checked]
    better = "ensemble" if arm["val"]["ensemble"] > arm["val"]["single"] else "single"
    assert arm["chosen"] == better
    assert (exp / "best-ensemble" / "ensemble.json").is_file() and (exp / "best-single" / "model.safetensors").is_file()
    assert (exp / "best" / "ensemble.json").is_file() == (better == "ensemble")
    assert "low" in arm["test"] and arm["test"]["rows"] > 0
    # best/ shows its own scores whichever it is, as a single export's metrics.json does
    shown = json.loads((exp / "best" / "metrics.json").read_text())
    assert shown["val.accuracy"] == pytest.approx(arm["val"][better])
    assert shown["test.accuracy"] == pytest.approx(arm["test"][better])
    ens = json.loads((exp / "best-ensemble" / "metrics.json").read_text())
    assert ens["test.rows"] == arm["test"]["rows"] and ens["val.accuracy"] == pytest.approx(arm["val"]["ensemble"])
    assert "ensemble:    the top 2 trials' probabilities averaged" in proc.stdout
    assert "## Ensemble vs single winner" in summary
    assert mmray.load_model(exp / "best-ensemble").predict(texts=["a small red circle"])[0]["class_name"]

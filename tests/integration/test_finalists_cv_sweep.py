"""Finalists scored by K-fold cross-validation on a real local Ray: `mmray tune --finalists 2 --finalists-cv 2` trains
each of the top two on each fold of train+val (from the decoded-input cache), the leaderboard, summary and report
show the CV mean +- sd and the folds, the winner is the best CV mean and best/ is its own checkpoint."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml
from helpers import HANG_S, small_job

from mmray.data.dataset_dir import read_dataset_info
from mmray.data.synth import synth
from mmray.export.writer import read_metrics
from mmray.tune.experiment import read_folds

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_finalists_are_cross_validated_and_the_best_cv_mean_wins(tmp_path):
    data = str(tmp_path / "synth")
    synth(data, rows=200, shards=1, seed=5)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(data, name="cv", epochs=2, workers=1, batch_size=32)
                                  .model_dump(mode="json")))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val.accuracy", "num_samples": 3,
        "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]}}}))
    proc = subprocess.run([sys.executable, "-m", "mmray.cli.main", "tune", str(job), "--space", str(space),
                           "--finalists", "2", "--finalists-cv", "2", "--storage", str(tmp_path / "runs"),
                           "--name", "exp"],
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "exp"
    rows = list(csv.DictReader(open(exp / "leaderboard.csv")))
    assert "val.accuracy.cv_mean" in rows[0] and "runs" not in rows[0]
    checked = [r for r in rows if r["folds"] == "2"]
    assert len(checked) == 2 and [r["rank"] for r in checked] == ["1", "2"]  # the finalists, by their CV mean
    means = [float(r["val.accuracy.cv_mean"]) for r in checked]
    assert means == sorted(means, reverse=True)  # the winner is the best CV mean
    assert all(float(r["val.accuracy.cv_sd"]) >= 0 for r in checked)
    assert rows[2]["folds"] == "" and rows[2]["val.accuracy.cv_mean"] == ""
    assert "finalists:   the top 2 scored by 2-fold cross-validation over train+val" in proc.stdout
    assert f"best trial:  {checked[0]['trial_id']}" in proc.stdout
    # the folds: train+val only, every row once; the same folds for both finalists
    folds = read_folds(str(exp))
    info = read_dataset_info(data)
    assert folds.k == 2 and set(folds.assignment) == {"train", "val"}
    assert {s: len(a) for s, a in folds.assignment.items()} == {s: info.split_rows(s) for s in ("train", "val")}
    # best/ is the winner's own best checkpoint from the sweep (scored on the val split, not on a fold)
    best = read_metrics(exp / "best")
    assert best["val.accuracy"] == pytest.approx(float(checked[0]["val.accuracy"]), abs=1e-6)
    assert best["val.rows"] + best.get("val.bad_records", 0) == info.split_rows("val")
    summary = (exp / "report" / "summary.md").read_text()
    assert "val.accuracy CV mean ± sd (folds)" in summary
    assert "2-fold cross-validation over train+val" in summary

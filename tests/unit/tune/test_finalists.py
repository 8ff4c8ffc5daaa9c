"""Finalists checked twice: who is re-checked, how they are ranked, and what the leaderboard and summary show."""
from __future__ import annotations

import csv

import pytest

from mmray.tune.experiment import write_leaderboard
from mmray.tune.finalists import mean_sd, pick, rank, search_budget
from mmray.tune.results import SweepSummary, TrialRecord, format_summary
from mmray.tune.space import SpaceConfig


def _trial(trial_id, score, rechecks=(), status="completed"):
    return TrialRecord(trial_id, {"train.optimizer.lr": 0.001}, status, 4, 3 if score is not None else None,
                       {"val.accuracy": score, "val.loss": 1.0} if score is not None else {}, None,
                       rechecks=list(rechecks))


def test_the_finalists_are_the_top_scored_trials():
    ranked = [_trial("a", 0.9), _trial("b", 0.8, status="error"), _trial("c", 0.7), _trial("d", None),
              _trial("e", 0.6)]
    assert [t.trial_id for t in pick(ranked, 3)] == ["a", "c", "e"]


def test_mean_and_sample_sd():
    assert mean_sd([0.9]) == (0.9, 0.0)
    mean, sd = mean_sd([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and sd == pytest.approx(0.1)


def test_the_winner_is_the_best_mean_not_the_luckiest_run():
    lucky = _trial("lucky", 0.95, rechecks=[0.80, 0.82])  # one good seed
    steady = _trial("steady", 0.90, rechecks=[0.91, 0.89])
    rest = _trial("rest", 0.85)
    ranked = rank([lucky, steady, rest], "val.accuracy", "max")
    assert [t.trial_id for t in ranked] == ["steady", "lucky", "rest"]
    assert [t.trial_id for t in rank([lucky, steady], "val.loss", "min")][0] in ("lucky", "steady")


def test_a_finalist_whose_reruns_the_budget_cut_keeps_its_own_score_among_the_finalists():
    # seen on a budgeted sweep: the job as is (0.698, its re-runs stopped by the budget before its best epoch)
    # lost to a re-checked trial whose mean was 0.679, only because the latter had been measured twice
    checked = _trial("checked", 0.684, rechecks=[0.673])
    baseline = _trial("baseline", 0.698)  # picked as a finalist; no re-run counted
    third = _trial("third", 0.682, rechecks=[0.690])
    ranked = rank([baseline, checked, third, _trial("rest", 0.60)], "val.accuracy", "max", finalists=3)
    assert [t.trial_id for t in ranked] == ["baseline", "third", "checked", "rest"]
    # outside the finalists nothing moves ahead of them
    ranked = rank([checked, baseline, _trial("rest", 0.99)], "val.accuracy", "max", finalists=2)
    assert [t.trial_id for t in ranked][-1] == "rest"


def test_the_leaderboard_and_summary_show_mean_and_sd(tmp_path):
    trials = rank([_trial("lucky", 0.95, [0.80, 0.82]), _trial("steady", 0.90, [0.91, 0.89]), _trial("rest", 0.85)],
                  "val.accuracy", "max")
    path = tmp_path / "leaderboard.csv"
    write_leaderboard(str(path), trials, ["train.optimizer.lr"], "val.accuracy")
    rows = list(csv.DictReader(path.open()))
    assert [r["trial_id"] for r in rows] == ["steady", "lucky", "rest"]
    assert float(rows[0]["val.accuracy.mean"]) == pytest.approx(0.9)
    assert float(rows[0]["val.accuracy.sd"]) == pytest.approx(0.01)
    assert rows[0]["runs"] == "3" and rows[2]["runs"] == "1" and rows[2]["val.accuracy.mean"] == ""
    text = format_summary(SweepSummary(str(tmp_path), "val.accuracy", "max", trials, None))
    assert "finalists:   the top 2 trained again with other seeds" in text
    assert "steady  0.9000 +- 0.0100  (3 runs: 0.9000, 0.9100, 0.8900)" in text


def test_without_rechecks_the_leaderboard_is_unchanged(tmp_path):
    path = tmp_path / "leaderboard.csv"
    write_leaderboard(str(path), [_trial("a", 0.9)], ["train.optimizer.lr"], "val.accuracy")
    assert "runs" not in path.read_text().splitlines()[0]


def test_with_finalists_the_search_leaves_a_quarter_of_the_budget_to_them():
    params = {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
    assert search_budget(SpaceConfig.model_validate({"parameters": params})) is None
    assert search_budget(SpaceConfig.model_validate({"parameters": params, "time_budget_s": 400})) == 400
    assert search_budget(SpaceConfig.model_validate({"parameters": params, "time_budget_s": 400,
                                                     "finalists": 3})) == 300


def _cv_trial(trial_id, score, folds):
    t = _trial(trial_id, score)
    t.fold_scores = list(folds)
    return t


def test_cross_validated_finalists_rank_by_their_fold_mean_and_show_it_with_the_folds(tmp_path):
    # the sweep's own run (on the val split) is not a fold: "lucky" ranks by its folds alone
    trials = rank([_cv_trial("lucky", 0.95, [0.70, 0.74]), _cv_trial("steady", 0.90, [0.86, 0.88]),
                   _trial("rest", 0.85)], "val.accuracy", "max")
    assert [t.trial_id for t in trials] == ["steady", "lucky", "rest"]
    path = tmp_path / "leaderboard.csv"
    write_leaderboard(str(path), trials, ["train.optimizer.lr"], "val.accuracy")
    rows = list(csv.DictReader(path.open()))
    assert "val.accuracy.cv_mean" in rows[0] and "runs" not in rows[0]
    assert float(rows[0]["val.accuracy.cv_mean"]) == pytest.approx(0.87)
    assert float(rows[0]["val.accuracy.cv_sd"]) == pytest.approx(0.0141421, abs=1e-6)
    assert rows[0]["folds"] == "2" and rows[2]["folds"] == "" and rows[2]["val.accuracy.cv_mean"] == ""
    summary = SweepSummary(str(tmp_path), "val.accuracy", "max", trials, None, folds=2)
    text = format_summary(summary)
    assert "finalists:   the top 2 scored by 2-fold cross-validation over train+val" in text
    assert "steady  0.8700 +- 0.0141  (2 folds: 0.8600, 0.8800)" in text

    from mmray.tune.report import Report, _finalists_line, _leaderboard_md

    space = SpaceConfig.model_validate({"parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})
    md = "\n".join(_leaderboard_md(Report(str(tmp_path), "val.accuracy", "max", [], None), rows, space))
    assert "val.accuracy CV mean ± sd (folds)" in md and "0.8700 ± 0.0141 (2)" in md
    assert "2-fold cross-validation over train+val" in _finalists_line(rows, "val.accuracy")[0]


def test_finalists_cv_needs_two_folds_and_finalists():
    params = {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
    assert SpaceConfig.model_validate({"parameters": params, "finalists": 3, "finalists_cv": 5}).finalists_cv == 5
    for bad, message in (({"finalists": 3, "finalists_cv": 1}, "needs at least 2 folds"),
                         ({"finalists_cv": 3}, "finalists is 0")):
        with pytest.raises(ValueError, match=message):
            SpaceConfig.model_validate({"parameters": params, **bad})
    assert search_budget(SpaceConfig.model_validate({"parameters": params, "time_budget_s": 400, "finalists": 3,
                                                     "finalists_cv": 2})) == 300

"""``mmray report``'s pure parts: the paired bootstrap, its verdicts, pairing by row id, plots, CLI refusals."""
from __future__ import annotations

import numpy as np
import pytest

from mmray.config import UserError
from mmray.train.evaluation import RowPredictions
from mmray.tune import report_plots as plots
from mmray.tune.control_arms import compare, paired_bootstrap_ci, verdict

PNG = b"\x89PNG\r\n\x1a\n"


def outcomes(n: int, accuracy: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < accuracy


def test_identical_predictions_give_a_zero_width_interval_at_zero():
    same = outcomes(200, 0.7, seed=1)
    ci = paired_bootstrap_ci(same, same, resamples=500, seed=0)
    assert (ci.difference, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert not ci.excludes_zero
    assert verdict(ci).startswith("not distinguishable")


def test_a_clearly_better_model_has_an_interval_above_zero():
    good, bad = outcomes(400, 0.9, seed=2), outcomes(400, 0.5, seed=3)
    ci = paired_bootstrap_ci(good, bad, resamples=2000, seed=0)
    assert ci.low > 0.0 and ci.low <= ci.difference <= ci.high
    assert ci.difference == pytest.approx(good.mean() - bad.mean())
    assert verdict(ci) == "the winner is better: the 95% CI excludes 0"
    flipped = paired_bootstrap_ci(bad, good, resamples=2000, seed=0)
    assert flipped.high < 0.0 and verdict(flipped).startswith("the control is better")


def test_close_models_are_not_distinguishable():
    a = outcomes(100, 0.7, seed=4)
    b = a.copy()
    b[:3] = ~b[:3]  # three rows differ
    ci = paired_bootstrap_ci(a, b, resamples=2000, seed=0)
    assert ci.low <= 0.0 <= ci.high and not ci.excludes_zero


def test_the_seed_makes_the_interval_reproducible():
    a, b = outcomes(300, 0.75, seed=5), outcomes(300, 0.65, seed=6)
    first = paired_bootstrap_ci(a, b, resamples=1000, seed=7)
    assert paired_bootstrap_ci(a, b, resamples=1000, seed=7) == first
    assert paired_bootstrap_ci(a, b, resamples=1000, seed=8) != first


def test_large_splits_are_resampled_in_chunks_with_the_same_result_shape():
    a, b = outcomes(50_000, 0.8, seed=9), outcomes(50_000, 0.79, seed=10)
    ci = paired_bootstrap_ci(a, b, resamples=400, seed=0)
    assert ci.rows == 50_000 and ci.resamples == 400
    assert ci.high - ci.low < 0.02  # the interval shrinks with N


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap_ci([True, False], [True])
    with pytest.raises(ValueError, match="no rows"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_ci([True], [False], level=1.5)


def test_compare_pairs_rows_by_id_and_drops_rows_only_one_model_read():
    labels = {"a": 0, "b": 1, "c": 2, "d": 0}
    winner = RowPredictions({"a": 0, "b": 1, "c": 2, "d": 0}, labels)  # all right
    control = RowPredictions({"a": 0, "b": 0, "c": 0}, {k: labels[k] for k in "abc"})  # no row d (undecodable)
    result = compare(winner, control, resamples=200, seed=0)
    assert result.ci.rows == 3
    assert result.winner_accuracy == 1.0 and result.control_accuracy == pytest.approx(1 / 3)
    assert result.ci.difference == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="share no test row"):
        compare(winner, RowPredictions({"x": 1}, {"x": 1}))


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_every_plot_writes_a_png(tmp_path):
    files = [
        plots.plot_history([1, 2, 4], [0.5, 0.7, 0.6], metric="val.accuracy", mode="max", winner_index=1,
                           path=tmp_path / "history.png"),
        plots.plot_importances({"train.optimizer.lr": 0.8, "model.fusion.name": 0.2}, metric="val.accuracy",
                               path=tmp_path / "importance.png"),
        plots.plot_parallel([plots.ParallelAxis("model.fusion.name", ["concat", "gated", None],
                                                categories=["concat", "gated", "late"]),
                             plots.ParallelAxis("train.optimizer.lr", [1e-4, 1e-2, 1e-3], log=True),
                             plots.ParallelAxis("model.fusion.dropout", [0.1, 0.1, 0.1])],  # constant axis
                            [1.2, 0.9, 1.0], metric="val.loss", mode="min", path=tmp_path / "parallel.png"),
        plots.plot_fusions({"concat": 0.6, "gated": 0.7}, metric="val.accuracy", winner="gated",
                           path=tmp_path / "fusions.png"),
        plots.plot_control_arms(["vs best single-modality trial"], [0.1], [0.02], [0.18], level=0.95,
                                path=tmp_path / "control_arms.png"),
    ]
    assert all(is_png(f) for f in files)


def test_report_of_a_folder_that_is_not_an_experiment_exits_2(tmp_path, capsys):
    from mmray.cli.main import main

    assert main(["report", str(tmp_path)]) == 2
    assert "not an mmray experiment" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_of_an_unfinished_sweep_says_how_to_finish_it(tmp_path, capsys):
    import yaml

    from mmray.cli.main import main

    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "t", "data": {"path": str(tmp_path / "data")}}))
    space = {"parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["report", str(tmp_path)]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failed_sweep(tmp_path, capsys):
    import yaml

    from mmray.tune.sweep import write_report_safely

    # a sweep folder whose results are gone (no leaderboard): what the end of a sweep must survive
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "t", "data": {"path": str(tmp_path / "data")}}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"parameters": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}))
    assert write_report_safely(str(tmp_path)) == (None, "")
    err = capsys.readouterr().err
    assert "warning: the sweep finished but its report was not written" in err
    assert f"mmray report {tmp_path}" in err

"""The built-in default space (`mmray tune JOB` without --space): shipped in the package, fitted to the job."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmray.config.loader import read_yaml
from mmray.tune.algorithms import grace_period
from mmray.tune.baseline import is_baseline
from mmray.tune.defaults import default_space, default_space_raw
from mmray.tune.space import SchedulerConfig, SpaceConfig, check_against_job, load_space

REPO = Path(__file__).resolve().parents[3]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_the_default_space_ships_inside_the_package():
    from importlib import resources

    assert resources.files("mmray.tune").joinpath("default_space.yaml").is_file()
    raw = default_space_raw()
    assert raw["baseline"] is True and raw["scheduler"]["grace_period"] == "auto"
    swept = set(raw["parameters"])
    for key in ("model.fusion.name", "model.fusion.rank", "train.optimizer.lr", "train.optimizer.weight_decay",
                "model.fusion.dropout", "train.modality_dropout", "model.encoders.text.name",
                "model.encoders.image.dim"):
        assert key in swept


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_the_default_space_validates_against_every_shipped_job(job):
    job_raw = read_yaml(str(job))
    space = load_space(None, job_raw)  # ConfigError naming parameters.<key> if not
    check_against_job(space, job_raw)
    point = space.baseline_point(job_raw)
    assert point and space.baseline  # the job as is is trial 1


def _job(**model) -> dict:
    return {"name": "t", "data": {"path": "data/x", "modalities": ["image", "text"]},
            "model": {"encoders": {"image": {"name": "resnet18", "weights": None}, "text": {"name": "gru"}},
                      "fusion": {"name": "tensor", "dim": 8}, **model},
            "train": {"optimizer": {"name": "adamw", "lr": 0.05, "weight_decay": 0.0}}}


def test_it_is_fitted_to_a_job_unlike_the_quickstart():
    job = _job()
    raw = default_space(job)
    params = raw["parameters"]
    assert not any(k.startswith("model.encoders.audio.") for k in params)  # not a modality of the job
    assert not any(k.startswith("model.encoders.image.") for k in params)  # a pretrained ResNet: kept as is
    assert "gru" in params["model.encoders.text.name"]["choice"]
    assert "tensor" in params["model.fusion.name"]["choice"]  # widened to the job's own fusion
    assert params["train.optimizer.lr"]["loguniform"][1] == 0.05  # widened to the job's learning rate
    assert "train.optimizer.weight_decay" not in params  # 0 is never drawn on a log scale: the job's 0 stays
    space = SpaceConfig.model_validate(raw)
    check_against_job(space, job)
    point = space.baseline_point(job)
    assert point["model.fusion.name"] == "tensor" and point["train.optimizer.lr"] == 0.05


def test_a_frozen_encoder_is_not_swept():
    job = _job()
    job["model"]["encoders"]["text"] = {"name": "transformer", "freeze": True}
    assert not any(k.startswith("model.encoders.text.") for k in default_space(job)["parameters"])


def test_a_trial_drawn_from_the_fitted_space_is_a_valid_job():
    import optuna

    from mmray.config.loader import apply_overrides, validate_job

    job = read_yaml(str(REPO / "jobs" / "quickstart.yaml"))
    space = load_space(None, job)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(25):
        values = space.sample(study.ask())
        validate_job(apply_overrides(job, values.items()))
        if values["model.fusion.name"] != "low_rank_tensor":
            assert "model.fusion.rank" not in values
    assert is_baseline(space.baseline_point(job), space.baseline_point(job))


@pytest.mark.parametrize("epochs,grace", [(1, 1), (4, 2), (10, 2), (20, 5), (40, 10)])
def test_auto_grace_period_grows_with_the_epoch_budget(epochs, grace):
    assert grace_period(SchedulerConfig(grace_period="auto"), epochs) == grace
    assert grace_period(SchedulerConfig(grace_period=3), epochs) == min(3, epochs)

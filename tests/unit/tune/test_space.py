"""Search spaces: parsing, conditionals, and validation against the job schema before anything runs."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from mmray.config import ConfigError
from mmray.tune.baseline import is_baseline
from mmray.tune.space import SpaceConfig, check_against_job, grid_size, load_space

REPO = Path(__file__).resolve().parents[3]
JOB = {"name": "t", "data": {"path": "data/x"}}

CONDITIONAL = {
    "parameters": {
        "model.encoders.text.name": {"choice": ["transformer", "gru"]},
        "model.encoders.text.heads": {"choice": [2, 4], "when": {"model.encoders.text.name": "transformer"}},
        "model.encoders.text.bidirectional": {"choice": [True, False], "when": {"model.encoders.text.name": "gru"}},
        "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
        "train.epochs": 3,
    }
}


def problems(space: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        check_against_job(SpaceConfig.model_validate(space), JOB)
    return e.value.problems


def test_conditionals_draw_only_their_branchs_parameters():
    space = SpaceConfig.model_validate(CONDITIONAL)
    check_against_job(space, JOB)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        values = space.sample(study.ask())
        branch = values["model.encoders.text.name"]
        seen.add(branch)
        assert ("model.encoders.text.heads" in values) == (branch == "transformer")
        assert ("model.encoders.text.bidirectional" in values) == (branch == "gru")
        assert 1e-4 <= values["train.optimizer.lr"] <= 1e-2 and values["train.epochs"] == 3
    assert seen == {"transformer", "gru"}


def test_conditions_are_drawn_before_the_parameters_that_need_them():
    reordered = {"parameters": dict(reversed(list(CONDITIONAL["parameters"].items())))}
    keys = [k for k, _ in SpaceConfig.model_validate(reordered).ordered_parameters()]
    assert keys.index("model.encoders.text.name") < keys.index("model.encoders.text.heads")


def test_unknown_key_bad_range_and_unknown_component_are_named():
    found = problems({"parameters": {
        "train.optimizer.lrr": {"loguniform": [1e-4, 1e-2]},
        "model.fusion.dropout": {"uniform": [0.0, 1.5]},
        "model.fusion.name": {"choice": ["concat", "nope"]},
    }})
    assert any(p.startswith("parameters.train.optimizer.lrr:") and "unknown key" in p for p in found)
    assert any(p.startswith("parameters.model.fusion.dropout: 1.5") for p in found)
    assert any(p.startswith("parameters.model.fusion.name: 'nope'") and "choose one of" in p for p in found)
    assert not any("0.0 ->" in p for p in found)  # the valid bound is not reported


def test_condition_on_a_value_never_drawn_is_an_error():
    space = {"parameters": {"model.encoders.text.name": {"choice": ["gru"]},
                            "model.encoders.text.heads": {"int": [1, 4], "when": {"model.encoders.text.name": "transformer"}}}}
    (msg,) = problems(space)
    assert msg.startswith("parameters.model.encoders.text.heads.when.model.encoders.text.name: 'transformer' is never")


@pytest.mark.parametrize("spec,message", [
    ({"uniform": [0.5, 0.1]}, "low must be below high"),
    ({"loguniform": [0.0, 0.1]}, "bounds must be positive"),
    ({"uniform": [0.1, 0.5], "choice": [1]}, "exactly one of"),
])
def test_malformed_distributions_are_rejected(spec, message):
    from mmray.tune.space import _parse

    with pytest.raises(ConfigError, match=message):
        _parse({"parameters": {"train.optimizer.lr": spec}}, "space.yaml")


def test_unknown_searcher_and_scheduler_list_the_registered_names():
    from mmray.tune.space import _parse

    with pytest.raises(ConfigError) as e:
        _parse({"search": {"algorithm": "bayes"}, "scheduler": {"name": "pbt"}, "parameters": {"train.epochs": 2}}, "s")
    assert e.value.problems == [
        "search.name: 'bayes' is not a searcher; choose one of cmaes, optuna_tpe, random",
        "scheduler.name: 'pbt' is not a scheduler; choose one of asha, median, none",
    ]


def test_grid_size_counts_discrete_spaces():
    assert grid_size(SpaceConfig.model_validate({"parameters": {"a.b": {"choice": [1, 2, 3]}, "c": {"int": [1, 4]}}})) == 12
    assert grid_size(SpaceConfig.model_validate(CONDITIONAL)) == float("inf")


def test_every_shipped_space_validates_against_the_quickstart_job():
    from mmray.config.loader import read_yaml

    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert spaces
    for path in spaces:
        load_space(str(path), read_yaml(REPO / "jobs" / "quickstart.yaml"))


def test_space_round_trips_through_the_experiment_folder(tmp_path):
    space = SpaceConfig.model_validate(CONDITIONAL)
    dumped = yaml.safe_load(yaml.safe_dump(space.model_dump(mode="json", by_alias=True, exclude_none=True)))
    assert SpaceConfig.model_validate(dumped) == space


def test_a_components_name_is_applied_before_its_other_keys():
    from mmray.config import validate_job
    from mmray.config.loader import apply_overrides

    space = SpaceConfig.model_validate({"parameters": {
        "model.fusion.hidden_dim": {"choice": [64]},
        "model.fusion.name": {"choice": ["gated"]},
    }})
    order = [k for k, _ in space.ordered_parameters()]
    assert order == ["model.fusion.name", "model.fusion.hidden_dim"]
    config = validate_job(apply_overrides(JOB, [(k, s.choice[0]) for k, s in space.ordered_parameters()]))
    assert config.model.fusion.name == "gated" and config.model.fusion.hidden_dim == 64


def test_the_baseline_point_is_the_jobs_own_values_of_the_drawn_parameters():
    from mmray.config.loader import read_yaml

    job = read_yaml(REPO / "jobs" / "quickstart.yaml")
    space = load_space(str(REPO / "search_spaces" / "quickstart.yaml"), job)
    assert space.baseline
    point = space.baseline_point(job)
    # exactly the job file's values, nothing drawn, nothing fixed by the space
    assert point["model.fusion.name"] == job["model"]["fusion"]["name"]
    assert point["train.optimizer.lr"] == job["train"]["optimizer"]["lr"]
    assert set(point) == {k for k, p in space.parameters.items() if p.value is None and space.active(k, point)}
    # Optuna hands the enqueued point back unchanged, so the sweep can recognise the baseline trial
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(point)
    assert is_baseline(space.sample(study.ask()), point)
    assert not is_baseline(space.sample(study.ask()), point)


def test_a_baseline_value_the_space_never_draws_is_named():
    space = {"baseline": True, "parameters": {"model.fusion.name": {"choice": ["gated", "late"]},
                                              "train.optimizer.lr": {"loguniform": [1e-2, 3e-2]}}}
    found = problems(space)
    assert any(p.startswith("parameters.model.fusion.name: baseline: the job's value 'concat' is never drawn")
               for p in found)
    assert any(p.startswith("parameters.train.optimizer.lr: baseline:") for p in found)

"""The job schema: defaults, overrides and errors that name the dotted key, the bad value and the choices."""
from pathlib import Path

import pytest
import yaml

from mmray.config import ConfigError, JobConfig, apply_overrides, load_job, to_yaml, validate_job
from mmray.config.loader import parse_override

REPO = Path(__file__).resolve().parents[3]
MINIMAL = {"name": "t", "data": {"path": "data/x"}}


def problems(overrides, raw=MINIMAL) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate_job(apply_overrides(raw, overrides))
    return e.value.problems


def test_every_shipped_job_validates():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ holds at least one job file"
    for path in jobs:
        assert isinstance(load_job(path), JobConfig)


def test_defaults_live_in_the_schema_and_render_fully():
    config = validate_job(MINIMAL)
    rendered = yaml.safe_load(to_yaml(config))
    assert rendered["model"]["fusion"]["name"] == "concat"
    assert rendered["train"]["optimizer"]["name"] == "adamw"
    assert rendered["data"]["modalities"] == ["audio", "image", "text"]
    # the rendered config is itself a valid config that means the same thing
    assert validate_job(rendered) == config


def test_unknown_fusion_names_key_value_and_choices():
    (msg,) = problems(["model.fusion.name=concatt"])
    assert msg.startswith("model.fusion.name: 'concatt' is not a fusion; choose one of ")
    assert "concat" in msg.split("choose one of ")[1]


def test_encoder_of_the_wrong_modality_is_rejected_with_that_modalitys_choices():
    (msg,) = problems(["model.encoders.text.name=cnn"])
    assert msg.startswith("model.encoders.text.name: 'cnn' is not a text encoder; choose one of ")
    assert "transformer" in msg and "mel_cnn" not in msg


def test_misspelt_key_is_an_error_not_a_silent_default():
    (msg,) = problems(["model.fusion.hidden_dimm=3"])
    assert msg.startswith("model.fusion.hidden_dimm: unknown key")


def test_all_problems_are_collected():
    found = problems(["train.epochs=0", "train.optimizer.name=lion", "model.fusion.dropout=2"])
    keys = sorted(p.split(":")[0] for p in found)
    assert keys == ["model.fusion.dropout", "train.epochs", "train.optimizer.name"]
    assert any("'lion'" in p and "adamw" in p for p in found)


def test_half_precision_needs_a_gpu():
    (msg,) = problems(["train.precision=bf16"])
    assert "train.precision" in msg and "scaling.use_gpu" in msg


@pytest.mark.parametrize(
    "text,expected",
    [("train.optimizer.lr=3e-4", 3e-4), ("train.epochs=5", 5), ("scaling.use_gpu=true", True),
     ("data.modalities=[image, audio]", ["image", "audio"]), ("name=run-7", "run-7")],
)
def test_overrides_are_parsed_as_yaml(text, expected):
    assert parse_override(text)[1] == expected


def test_switching_a_component_drops_the_old_components_keys():
    raw = {**MINIMAL, "model": {"encoders": {"text": {"name": "transformer", "heads": 2}}}}
    config = validate_job(apply_overrides(raw, ["model.encoders.text.name=gru"]))
    assert config.model.encoders.text.name == "gru"


def test_override_without_equals_is_a_usage_error():
    from mmray.config.errors import UserError

    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides(MINIMAL, ["train.epochs"])


def test_config_error_pickles_across_processes():
    import pickle

    e = ConfigError(["a.b: bad"], "job.yaml")
    again = pickle.loads(pickle.dumps(e))
    assert again.problems == ["a.b: bad"] and str(again) == str(e)


# ------------------------------------------------------------------ --set NAME: what a switch keeps
def test_setting_the_jobs_own_name_drops_nothing():
    raw = {**MINIMAL, "train": {"epochs": 3, "optimizer": {"lr": 3e-3}}}
    config = validate_job(apply_overrides(raw, ["name=tiny2"]))
    assert config.name == "tiny2" and config.data.path == "data/x"
    assert config.train.epochs == 3 and config.train.optimizer.lr == 3e-3


def test_switching_the_optimizer_keeps_the_keys_both_have(caplog):
    raw = {**MINIMAL, "train": {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1}}}
    config = validate_job(apply_overrides(raw, ["train.optimizer.name=sgd"], warn=True))
    assert config.train.optimizer.name == "sgd"
    assert config.train.optimizer.lr == 3e-3 and config.train.optimizer.weight_decay == 0.1
    assert "warning" not in caplog.text


def test_switching_a_fusion_keeps_shared_keys_and_names_each_one_dropped(caplog):
    raw = {**MINIMAL, "model": {"fusion": {"name": "low_rank_tensor", "rank": 3, "hidden_dim": 64}}}
    with caplog.at_level("WARNING"):
        config = validate_job(apply_overrides(raw, ["model.fusion.name=concat"], warn=True))
    assert config.model.fusion.name == "concat" and config.model.fusion.hidden_dim == 64
    assert "model.fusion.rank is not a key of 'concat'" in caplog.text


def test_switching_from_an_implicit_default_component_drops_only_what_the_new_one_lacks(caplog):
    raw = {**MINIMAL, "model": {"encoders": {"text": {"heads": 2, "dim": 64}}}}  # no name: the default transformer
    with caplog.at_level("WARNING"):
        config = validate_job(apply_overrides(raw, ["model.encoders.text.name=gru"], warn=True))
    assert config.model.encoders.text.dim == 64
    assert "model.encoders.text.heads is not a key of 'gru'" in caplog.text


@pytest.mark.parametrize("key", ["train.optimizer.lr", "train.grad_clip", "model.fusion.dropout",
                                 "data.audio.seconds", "train.task_weights.label", "model.encoders.text.lr_mult"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan"])
def test_every_float_key_is_finite_only(key, value):
    (msg,) = problems([f"{key}={value}"])
    assert msg.startswith(f"{key}: ") and "finite numbers only" in msg


def test_a_bare_yaml_on_or_off_means_the_word_where_the_choices_are_words(tmp_path):
    # YAML 1.1 reads `on`/`off` as booleans; a user writing `decode_cache: off` means the choice 'off'
    job = tmp_path / "job.yaml"
    job.write_text("name: j\ndata: {path: d, decode_cache: off}\ntrain: {compile: off, channels_last: on}\n")
    config = load_job(str(job), ["train.embedding_cache=off"])
    assert (config.data.decode_cache, config.train.compile, config.train.channels_last) == ("off", "off", "on")
    assert config.train.embedding_cache == "off"
    with pytest.raises(ConfigError, match="train.embedding_cache: 'on' is not valid; choose one of 'auto' or 'off'"):
        load_job(str(job), ["train.embedding_cache=on"])

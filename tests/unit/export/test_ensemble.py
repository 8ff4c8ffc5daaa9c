"""Ensemble exports (the members' probabilities averaged) and weight soups, loaded like any export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmray
from mmray.config import UserError, validate_job
from mmray.data.reader import iter_batches
from mmray.data.tokenizer import TextTokenizer
from mmray.export import write_export
from mmray.export.ensemble import write_ensemble, write_soup
from mmray.models.builder import build_job_model, job_tasks


def _member(exported, tmp: Path, folder: str, seed: int, fusion: str = "concat") -> Path:
    raw = exported.config.model_dump(mode="json")
    if fusion != "concat":
        raw["model"]["fusion"] = {"name": fusion, "hidden_dim": 8, "dropout": 0.0}
    config = validate_job(raw)
    info = exported.info
    tokenizer = TextTokenizer.load(config.data.text, info)
    torch.manual_seed(seed)
    model = build_job_model(config, job_tasks({k: list(v) for k, v in info.tasks.items()}), tokenizer).eval()
    out = tmp / folder
    write_export(out, model, config, info, tokenizer, {"val.accuracy": 0.5}, epoch=1)
    return out


@pytest.fixture(scope="module")
def members(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("members")
    return {"a": _member(exported, tmp, "a", 1), "b": _member(exported, tmp, "b", 2),
            "gated": _member(exported, tmp, "gated", 3, fusion="gated")}


def _batch(exported):
    return next(iter_batches(exported.config.data, exported.info, "test", batch_size=16, train=False))


def test_an_ensemble_export_predicts_the_mean_of_its_members_probabilities(exported, members, tmp_path):
    out = write_ensemble(tmp_path / "best", [members["a"], members["gated"]], sources=["t1", "t2"])
    ensemble = mmray.load_model(out)
    a, g = mmray.load_model(members["a"]), mmray.load_model(members["gated"])
    batch = _batch(exported)
    expected = (a.predict_batch(batch) + g.predict_batch(batch)) / 2
    assert torch.allclose(ensemble.predict_batch(batch), expected, atol=1e-6)
    assert not torch.allclose(a.predict_batch(batch), g.predict_batch(batch))  # the members do differ
    # raw inputs too: decoded once, as each member would
    rows = ensemble.predict(texts=["a small red circle", None])
    mean = [(x["probabilities"][k] + y["probabilities"][k]) / 2
            for x, y in zip(a.predict(texts=["a small red circle", None]), g.predict(texts=["a small red circle", None]))
            for k in ensemble.class_names]
    assert [p for r in rows for p in r["probabilities"].values()] == pytest.approx(mean, abs=1e-6)
    assert ensemble.class_names == a.class_names


def test_an_ensemble_evaluates_and_compresses_like_any_export(exported, members, tmp_path):
    from mmray.export import evaluate, quantize_export

    out = write_ensemble(tmp_path / "best", [members["a"], members["b"]])
    result = evaluate(out, exported.data_dir, split="test")
    assert result["rows"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    q = quantize_export(out, "fp16", out=tmp_path / "best-fp16")
    assert q["weights_bytes"] < q["source_weights_bytes"]
    batch = _batch(exported)
    assert torch.allclose(mmray.load_model(q["out"]).predict_batch(batch), mmray.load_model(out).predict_batch(batch),
                          atol=5e-3)


def test_members_that_read_inputs_differently_are_refused(exported, members, tmp_path):
    raw = exported.config.model_dump(mode="json")
    raw["data"]["image"]["size"] = 24
    config = validate_job(raw)
    tokenizer = TextTokenizer.load(config.data.text, exported.info)
    model = build_job_model(config, job_tasks({k: list(v) for k, v in exported.info.tasks.items()}), tokenizer)
    write_export(tmp_path / "big", model.eval(), config, exported.info, tokenizer, {}, epoch=1)
    with pytest.raises(UserError, match=r"cannot join an ensemble .*data\.image"):
        write_ensemble(tmp_path / "best", [members["a"], tmp_path / "big"])
    assert not (tmp_path / "best").exists()


def test_a_weight_soup_averages_members_of_one_architecture(exported, members, tmp_path):
    out = write_soup(tmp_path / "soup", [members["a"], members["b"]])
    a, b = load_file(str(members["a"] / "model.safetensors")), load_file(str(members["b"] / "model.safetensors"))
    soup = load_file(str(out / "model.safetensors"))
    key = next(k for k, v in a.items() if v.is_floating_point() and not torch.equal(v, b[k]))
    assert torch.allclose(soup[key], (a[key] + b[key]) / 2)
    mmray.load_model(out).predict_batch(_batch(exported))  # loads and runs like any export


def test_a_weight_soup_of_different_architectures_is_refused_with_a_clear_message(members, tmp_path):
    with pytest.raises(UserError) as e:
        write_soup(tmp_path / "soup", [members["a"], members["gated"]])
    msg = str(e.value)
    assert msg.startswith("weight soup refused: ") and "different architectures" in msg
    assert "model.fusion.name: 'gated' vs 'concat'" in msg and "ensemble export" in msg
    assert not (tmp_path / "soup").exists()

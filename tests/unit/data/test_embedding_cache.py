"""The frozen-encoder embedding cache without Ray: exact logits, the key, refusals, one build under concurrency,
and cached training giving the same run as training through the encoders."""
from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
from helpers import SMALL_MODEL

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.data import cache
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.models.cached import check_cached_encoders, encoder_hashes
from mmray.train.context import LocalContext, LoopInputs
from mmray.train.local import train_local
from mmray.train.loop import train_loop


def frozen_job(data: str, *, fusion: str = "concat", **overrides) -> dict:
    model = copy.deepcopy(SMALL_MODEL)
    for enc in model["encoders"].values():
        enc["freeze"] = True
    model["fusion"] = {"name": fusion}
    raw = {"name": "cached", "data": {"path": data, "image": {"augment": False}}, "model": model,
           "train": {"epochs": 2, "batch_size": 16, "early_stopping": {"patience": None}}}
    for key, value in overrides.items():
        node = raw
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "synth")
    synth(path, rows=160, shards=2, seed=3)
    return path


def builds(data: str) -> list[dict]:
    log = os.path.join(data, cache.CACHE_DIR, cache.BUILDS_LOG)
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_logits_from_cache_equal_logits_from_the_encoders(data, fusion):
    config = validate_job(frozen_job(data, fusion=fusion))
    info = read_dataset_info(data)
    plan = cache.plan(config, info, build=True, runner="local")
    assert plan.used, plan.reason
    model = cache.build_job_encoders(config, info).eval()
    train_cached, val_cached = cache.cached_readers(config, plan)
    for split, cached in (("train", train_cached(3)), ("val", val_cached(3))):
        raw = iter_batches(config.data, info, split, batch_size=16, train=split == "train", seed=0, epoch=3)
        n = 0
        with torch.no_grad():
            for r, c in zip(raw, cached, strict=True):
                assert torch.equal(r["label"], c["label"])  # the same rows in the same (shuffled) order
                assert any(k.endswith(".pooled") for k in c) and "image" not in c  # no raw input: encoders skipped
                torch.testing.assert_close(model(c).logits["label"], model(r).logits["label"], rtol=1e-5, atol=1e-5)
                n += len(r["label"])
        assert n == info.split_rows(split)


def key_of(raw: dict, modality: str) -> str:
    config = validate_job(raw)
    parts = cache.key_parts(config, read_dataset_info(raw["data"]["path"]), modality, sequences=False)
    return cache.entry_name(config, modality, parts)


def test_key_changes_with_encoder_config_weights_and_preprocessing(data, tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"first weights")
    base = frozen_job(data, **{"model.encoders.image": {"name": "resnet18", "weights": str(weights), "freeze": True}})
    image, audio = key_of(base, "image"), key_of(base, "audio")
    changed = {
        "encoder config": frozen_job(data, **{"model.encoders.image": {"name": "resnet18", "weights": str(weights),
                                                                          "freeze": True, "dim": 32}}),
        "preprocessing": {**base, "data": {**base["data"], "image": {"augment": False, "size": 48}}},
        "seed (random init)": {**base, "train": {**base["train"], "seed": 1}},
    }
    for what, raw in changed.items():
        assert key_of(raw, "image") != image, what
    weights.write_bytes(b"other weights")  # same path, new contents
    assert key_of(base, "image") != image
    # training-only keys change no output, and an encoder built later does not touch an earlier one's key
    lr_mult = copy.deepcopy(base)
    lr_mult["model"]["encoders"]["image"]["lr_mult"] = 0.1
    assert key_of(lr_mult, "audio") == audio
    later = copy.deepcopy(base)
    later["model"]["encoders"]["text"]["dim"] = 32
    assert key_of(later, "audio") == audio
    text_len = {**base, "data": {**base["data"], "text": {"max_length": 16}}}
    assert key_of(text_len, "text") != key_of(base, "text")


@pytest.mark.parametrize("override, key", [
    ({"model.encoders.text.freeze": False}, "model.encoders.text.freeze"),
    ({"data.image.augment": True}, "data.image.augment"),
    ({"train.embedding_cache": "off"}, "train.embedding_cache"),
])
def test_a_trained_encoder_or_augmentation_refuses_the_cache(data, override, key):
    config = validate_job(frozen_job(data, **override))
    with pytest.raises(UserError, match=key):
        cache.refuse_unless_usable(config)
    plan = cache.plan(config, read_dataset_info(data), build=True, runner="local")
    assert not plan.used and key in plan.line()


def test_a_model_with_other_encoder_weights_refuses_the_cached_batches(data):
    config = validate_job(frozen_job(data))
    info = read_dataset_info(data)
    plan = cache.plan(config, info, build=True, runner="local")
    other = cache.build_job_encoders(validate_job(frozen_job(data, **{"train.seed": 5})), info)
    with pytest.raises(RuntimeError, match="different encoder weights"):
        check_cached_encoders(encoder_hashes(other, plan.weights), plan.weights)
    mine = cache.build_job_encoders(config, info)
    check_cached_encoders(encoder_hashes(mine, plan.weights), plan.weights)  # its own weights pass


def test_concurrent_builders_build_once(tmp_path):
    path = str(tmp_path / "synth")
    synth(path, rows=80, shards=2, seed=5)
    config = validate_job(frozen_job(path))
    info = read_dataset_info(path)
    plans, errors = [], []

    def trial():
        try:
            plans.append(cache.plan(config, info, build=True, runner="local"))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(p.used for p in plans) and len(plans) == 3
    assert sorted(b["modality"] for b in builds(path)) == ["audio", "image", "text"]  # one build per modality
    assert sum(p.reason.startswith("built") for p in plans) == 1
    listed = cache.list_caches(path)
    assert len(listed) == 3 and all(c["bytes"] > 0 and not c["stale"] for c in listed)


def test_a_partial_cache_serves_the_frozen_epochs_and_the_run_is_the_same(data, tmp_path):
    """audio unfreezes after epoch 1: epoch 1 trains from the cache, epochs 2-3 decode and run the encoders,
    and the whole run (optimizer state at the unfreeze included) matches training through the encoders."""
    config = validate_job(frozen_job(data, **{"train.epochs": 3, "model.encoders.audio.unfreeze_after_epochs": 1}))
    info = read_dataset_info(data)
    plan = cache.plan(config, info, build=True, runner="local")
    assert plan.used and plan.partial and plan.epochs == 1, plan.line()
    assert "epochs 1-1, then the encoders unfreeze" in plan.line()
    train_batches, val_batches = cache.cached_readers(config, plan)
    assert "audio.pooled" in next(iter(train_batches(1))) and "audio.pooled" in next(iter(val_batches(1)))
    assert "audio" in next(iter(train_batches(2))) and "audio.pooled" not in next(iter(train_batches(2)))
    _, raw_ctx = train_local(config, str(tmp_path / "raw"))
    ctx = LocalContext(str(tmp_path / "cached"), train_batches, val_batches)
    train_loop(config, ctx, LoopInputs.from_cache(plan))
    for raw, cached in zip(raw_ctx.history, ctx.history, strict=True):
        for k in ("train.loss", "val.loss", "val.accuracy"):
            assert cached[k] == pytest.approx(raw[k], rel=1e-4, abs=1e-5), (raw["epoch"], k)


def test_cached_training_gives_the_same_run(data, tmp_path):
    config = validate_job(frozen_job(data, **{"train.modality_dropout": 0.2}))
    info = read_dataset_info(data)
    plan = cache.plan(config, info, build=True, runner="local")
    _, raw_ctx = train_local(config, str(tmp_path / "raw"))
    ctx = LocalContext(str(tmp_path / "cached"), *cache.cached_readers(config, plan))
    train_loop(config, ctx, LoopInputs.from_cache(plan))
    for raw, cached in zip(raw_ctx.history, ctx.history, strict=True):
        for k in ("train.loss", "val.loss", "val.accuracy"):
            assert cached[k] == pytest.approx(raw[k], rel=1e-4, abs=1e-5), k


def test_the_best_epoch_is_measured_from_the_cache_with_the_metrics_raw_inputs_give(data, monkeypatch):
    from mmray.models.builder import job_tasks
    from mmray.train import finalize

    config = validate_job(frozen_job(data))
    info = read_dataset_info(data)
    assert cache.plan(config, info, build=True, runner="local").used
    assert all("test" in e.manifest["splits"] for e in cache.plan(config, info, build=False).entries.values())
    model = cache.build_job_encoders(config, info).eval()
    tasks = job_tasks(info.tasks)
    raw = finalize.evaluate_splits(model, validate_job(frozen_job(data, **{"train.embedding_cache": "off"})), info, tasks)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the shards although the cache holds every split")
    monkeypatch.setattr(finalize, "iter_batches", no_decoding)
    cached = finalize.evaluate_splits(model, config, info, tasks)
    assert cached.keys() == raw.keys() and "test.accuracy" in cached and "val.diagnostics.without_image.f1" in cached
    for key, value in raw.items():
        if isinstance(value, float):
            assert cached[key] == pytest.approx(value, abs=1e-6), key


def test_a_long_build_prints_progress_a_person_can_follow():
    import io

    now = [0.0]
    out = io.StringIO()
    progress = cache.BuildProgress(12000, ["text", "audio"], every_s=10, out=out, clock=lambda: now[0])
    for _ in range(5):  # 500 rows per 2 s: silent until 10 s have passed
        now[0] += 2.0
        progress.add(500)
    assert out.getvalue() == "mmray embedding cache: 2,500/12,000 rows encoded (21%; audio, text), 250 rows/s, ETA 0m38s\n"
    now[0] += 1.0
    progress.add(500)
    assert out.getvalue().count("\n") == 1  # at most one line per 10 s

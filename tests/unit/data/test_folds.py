"""K-fold cross-validation folds over train+val (no Ray): stratified, disjoint, covering train+val exactly, seeded,
never holding a test row, and read from the decoded-input cache as row subsets without decoding again."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.data import decoded
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import Preprocessor
from mmray.data.folds import Folds, check_fold_count, make_folds, split_labels, stratified_folds
from mmray.data.synth import synth

# three classes of uneven size, in two splits
LABELS = {"train": np.array([0] * 23 + [1] * 11 + [2] * 6), "val": np.array([0] * 4 + [1] * 3 + [2] * 1)}


def _held_out(folds: Folds) -> list[dict[str, np.ndarray]]:
    return [folds.rows(k, held_out=True) for k in range(folds.k)]


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_every_row_of_train_and_val_is_in_exactly_one_fold(k):
    folds = stratified_folds(LABELS, k, seed=0)
    assert set(folds.assignment) == {"train", "val"}
    for split, labels in LABELS.items():
        seen = np.concatenate([h[split] for h in _held_out(folds)])
        assert sorted(seen.tolist()) == list(range(len(labels)))  # disjoint, and the union is the whole split
    for fold in range(k):  # a fold's training rows are every row it does not hold out
        train, held = folds.rows(fold, held_out=False), folds.rows(fold, held_out=True)
        for split, labels in LABELS.items():
            assert not set(train[split]) & set(held[split])
            assert len(train[split]) + len(held[split]) == len(labels)
    sizes = folds.sizes()
    assert sum(sizes) == 48 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_each_fold_holds_every_class_in_proportion(k):
    folds = stratified_folds(LABELS, k, seed=1)
    flat = np.concatenate([LABELS["train"], LABELS["val"]])
    for c in np.unique(flat):
        per_fold = [sum(int((LABELS[s][h[s]] == c).sum()) for s in LABELS) for h in _held_out(folds)]
        assert sum(per_fold) == int((flat == c).sum())
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)  # each class dealt evenly: stratified


def test_the_folds_are_seeded():
    a, b, other = (stratified_folds(LABELS, 3, seed=s) for s in (7, 7, 8))
    for s in LABELS:
        assert np.array_equal(a.assignment[s], b.assignment[s])
    assert any(not np.array_equal(a.assignment[s], other.assignment[s]) for s in LABELS)
    again = Folds.from_json(a.to_json())  # what folds.json records gives the same folds back
    assert again.k == 3 and again.seed == 7 and all(np.array_equal(again.assignment[s], a.assignment[s]) for s in LABELS)


def test_too_many_folds_for_the_smallest_class_is_refused():
    with pytest.raises(ValueError, match="at least 8 rows of every class"):
        stratified_folds(LABELS, 8, seed=0)  # class 2 has 7 rows in train+val
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(LABELS, 1, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("folds") / "synth")
    synth(path, rows=160, shards=2, seed=3)
    return path


def test_the_folds_of_a_dataset_cover_train_and_val_and_never_test(data):
    info = read_dataset_info(data)
    folds = make_folds(info, 4, seed=0)
    assert set(folds.assignment) == {"train", "val"}  # no test row has a fold
    assert {s: len(a) for s, a in folds.assignment.items()} == {s: info.split_rows(s) for s in ("train", "val")}
    assert sum(folds.sizes()) == info.split_rows("train") + info.split_rows("val")
    labels = split_labels(info, "train")
    assert len(labels) == info.split_rows("train") and set(labels.tolist()) <= set(range(info.num_classes()))


def test_a_class_with_fewer_rows_than_folds_is_refused_naming_the_flag_and_what_fits(data):
    info = read_dataset_info(data)
    labels = np.concatenate([split_labels(info, s) for s in ("train", "val")])
    smallest = int(np.bincount(labels).min())
    check_fold_count(info, smallest, "--finalists-cv")  # just enough rows: fine
    with pytest.raises(UserError) as e:
        check_fold_count(info, smallest + 1, "--finalists-cv")
    assert str(e.value).startswith(f"--finalists-cv: {smallest + 1} folds need at least {smallest + 1} rows of every "
                                   f"class in train+val")
    assert f"choose --finalists-cv {smallest} or fewer" in str(e.value)


def _job(data: str) -> dict:
    return {"name": "folds", "data": {"path": data, "decode_cache": "on"}, "model": copy.deepcopy(SMALL_MODEL),
            "train": {"epochs": 1, "batch_size": 16, "early_stopping": {"patience": None}}}


def test_a_fold_is_read_from_the_decoded_cache_as_a_row_subset_of_train_and_val(data, monkeypatch):
    config = validate_job(_job(data))
    info = read_dataset_info(data)
    plan = decoded.plan(config, info, build=True, runner="local")
    assert plan.used

    def whole(split):  # every row of the split, in order, as a validation reader reads them
        out = list(decoded.iter_decoded_batches(plan.entry, config.data, info, split, batch_size=16, train=False))
        return {k: torch.cat([b[k] for b in out]) for k in ("image", "label")}

    full = {s: whole(s) for s in ("train", "val")}
    folds = make_folds(info, 3, seed=0)
    read_parts: list[str] = []
    real_read_part = decoded.read_part
    monkeypatch.setattr(decoded, "read_part", lambda path, d, **kw: read_parts.append(path) or real_read_part(path, d, **kw))
    monkeypatch.setattr(Preprocessor, "decode", lambda self, batch: pytest.fail("a fold decoded a row again"))
    for k in range(3):
        train_rows, held_out = folds.rows(k, held_out=False), folds.rows(k, held_out=True)
        fold_train, fold_val = decoded.fold_readers(config, plan, train_rows, held_out)
        got = list(fold_val(0))
        expected = {key: torch.cat([full[s][key][torch.from_numpy(held_out[s])] for s in ("train", "val")])
                    for key in ("image", "label")}
        assert torch.equal(torch.cat([b["label"] for b in got]), expected["label"])  # the held-out rows, in order
        assert torch.equal(torch.cat([b["image"] for b in got]), expected["image"])
        trained = list(fold_train(0))  # shuffled and augmented: the right number of rows and of each class
        want = np.concatenate([split_labels(info, s)[train_rows[s]] for s in ("train", "val")])
        assert sum(len(b["label"]) for b in trained) == len(want)
        assert sorted(torch.cat([b["label"] for b in trained]).tolist()) == sorted(want.tolist())
        again = list(fold_train(0))  # seeded: the same epoch gives the same batches
        assert all(torch.equal(a["label"], b["label"]) for a, b in zip(trained, again, strict=True))
    assert read_parts and not [p for p in read_parts if "/test/" in p]  # no test row is ever read by a fold


def test_a_fold_without_the_decoded_cache_is_refused(data):
    config = validate_job({**_job(data), "data": {"path": data, "decode_cache": "off"}})
    plan = decoded.plan(config, read_dataset_info(data), build=False)
    folds = stratified_folds(LABELS, 2, seed=0)
    with pytest.raises(Exception, match="read from the decoded-input cache.*data.decode_cache is off"):
        decoded.fold_readers(config, plan, folds.rows(0, held_out=False), folds.rows(0, held_out=True))

"""The in-process reader: every row of a split exactly once, seeded shuffling, torch batches."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from mmray.config.errors import UserError
from mmray.data.reader import iter_batches


def _split_ids(info, split):
    return [i for f in info.split_files(split) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


@pytest.mark.parametrize("train", [False, True])
def test_every_row_exactly_once(data_cfg, tiny_info, train):
    ids, labels = [], []
    for batch in iter_batches(data_cfg, tiny_info, "train", batch_size=7, train=train, with_ids=True):
        assert isinstance(batch["image"], torch.Tensor) and batch["image"].shape[1:] == (3, 32, 32)
        assert len(batch["id"]) == len(batch["label"]) <= 7
        ids += batch["id"]
        labels += batch["label"].tolist()
    expected = _split_ids(tiny_info, "train")
    assert sorted(ids) == sorted(expected) and len(ids) == tiny_info.split_rows("train")
    if not train:
        assert ids == expected  # eval order is the file order


def test_shuffle_is_seeded_and_changes_per_epoch(data_cfg, tiny_info):
    def order(seed, epoch):
        return [i for b in iter_batches(data_cfg, tiny_info, "train", batch_size=8, train=True, seed=seed,
                                        epoch=epoch, with_ids=True) for i in b["id"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != _split_ids(tiny_info, "train")


def test_labels_match_the_shards(data_cfg, tiny_info):
    truth = {}
    for f in tiny_info.split_files("val"):
        for row in pq.read_table(f, columns=["id", "label"]).to_pylist():
            truth[row["id"]] = row["label"]
    seen = {}
    for b in iter_batches(data_cfg, tiny_info, "val", batch_size=4, train=False, with_ids=True):
        seen.update(zip(b["id"], b["label"].tolist()))
    assert seen == truth


def test_bad_split_and_batch_size_are_user_errors(data_cfg, tiny_info):
    with pytest.raises(UserError, match="split 'dev'"):
        next(iter_batches(data_cfg, tiny_info, "dev", batch_size=4, train=False))
    with pytest.raises(UserError, match="batch_size"):
        next(iter_batches(data_cfg, tiny_info, "val", batch_size=0, train=False))


def test_local_data_path_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, mmray.data, mmray.data.reader, mmray.data.decode, mmray.data.synth, mmray.data.inspect; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

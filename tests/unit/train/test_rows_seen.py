"""The loop's account of the rows an epoch saw (``rows_seen`` of each ``epoch_end`` event), from the batches'
``row_key``: every row of the split once gives the split's count and key sum; a row twice or missing does not."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from helpers import small_job

from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import ROW_KEY, row_keys
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.train.context import LocalContext
from mmray.train.loop import train_loop


@pytest.fixture
def config(tmp_path):
    synth(str(tmp_path / "synth"), rows=120, shards=2, seed=0)
    return small_job(str(tmp_path / "synth"), workers=1, epochs=2, batch_size=16)


def _split_keys(config) -> tuple[int, int]:
    info = read_dataset_info(config.data.path)
    ids = [i for f in info.split_files("train") for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    return len(ids), int(row_keys(ids).sum())


def _run(config, run_dir, alter=lambda batches: batches):
    info = read_dataset_info(config.data.path)
    events = []

    def train(epoch):
        def keyed():
            for b in iter_batches(config.data, info, "train", batch_size=16, train=True, epoch=epoch, with_ids=True):
                b[ROW_KEY] = torch.from_numpy(row_keys(b.pop("id")))  # as the Ray Data pipeline adds it
                yield b
        return alter(keyed())

    def val(epoch):
        return iter_batches(config.data, info, "val", batch_size=16, train=False, epoch=epoch)

    train_loop(config, LocalContext(run_dir, train, val, on_progress=events.append))
    return [e for e in events if e["type"] == "epoch_end"]


def test_every_row_once_gives_the_splits_count_and_key_sum(config, tmp_path):
    rows, total = _split_keys(config)
    ends = _run(config, str(tmp_path / "run"))
    assert [e["rows_seen"] for e in ends] == [{"rows": rows, "sum": total}] * 2
    assert all("rows_seen" not in e["metrics"] for e in ends)  # an account, not a metric


def test_a_row_seen_twice_instead_of_another_shows(config, tmp_path):
    rows, total = _split_keys(config)

    def swap_one(batches):  # the first row of the second batch replaced by a copy of the first batch's first row
        first = None
        for i, b in enumerate(batches):
            if i == 0:
                first = {k: v[:1].clone() for k, v in b.items()}
            elif i == 1:
                b = {k: torch.cat([first[k], v[1:]]) for k, v in b.items()}
            yield b

    ends = _run(config, str(tmp_path / "run"), swap_one)
    assert ends[0]["rows_seen"]["rows"] == rows and ends[0]["rows_seen"]["sum"] != total


def test_batches_without_row_keys_give_no_account(config, tmp_path):
    from mmray.train.local import train_local

    events = []
    train_local(config, str(tmp_path / "run"), on_event=events.append)
    assert all("rows_seen" not in e for e in events if e["type"] == "epoch_end")

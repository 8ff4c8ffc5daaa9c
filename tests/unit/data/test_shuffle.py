"""``data.shuffle``: files / local / global / none, in-process. Every row once per epoch under every mode; the
order changes between epochs and repeats for a seed; ``files`` keeps a row group's rows together."""
from __future__ import annotations

import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import Shuffle, iter_batches

ROW_GROUP = 4


@pytest.fixture(scope="module")
def many_groups(tiny_dir, tmp_path_factory):
    """The tiny dataset with 4-row row groups (12 in train), so orders of row groups can differ."""
    out = str(tmp_path_factory.mktemp("groups") / "ds")
    shutil.copytree(tiny_dir, out)
    info = read_dataset_info(out)
    for split in info.splits:
        for f in info.split_files(split):
            pq.write_table(pq.read_table(f), f, row_group_size=ROW_GROUP)
    return info


def _order(info, mode, seed, epoch, batch_size=5):
    data = DataConfig(path=info.path, shuffle=mode, shuffle_buffer_rows=8)
    return [i for b in iter_batches(data, info, "train", batch_size=batch_size, train=True, seed=seed, epoch=epoch,
                                    with_ids=True) for i in b["id"]]


def _groups(info):
    return [pq.ParquetFile(f).read_row_group(g, columns=["id"]).column("id").to_pylist()
            for f in info.split_files("train") for g in range(pq.ParquetFile(f).num_row_groups)]


@pytest.mark.parametrize("mode", ["files", "local", "global", "none"])
def test_every_row_exactly_once_per_epoch(many_groups, mode):
    want = Counter(i for g in _groups(many_groups) for i in g)
    assert len(want) == many_groups.split_rows("train") > 3 * ROW_GROUP
    for epoch in range(3):
        assert Counter(_order(many_groups, mode, 0, epoch)) == want


@pytest.mark.parametrize("mode", ["files", "local", "global"])
def test_order_is_new_each_epoch_and_the_same_for_a_seed(many_groups, mode):
    first, second = _order(many_groups, mode, 7, 0), _order(many_groups, mode, 7, 1)
    assert first != second
    assert _order(many_groups, mode, 7, 0) == first and _order(many_groups, mode, 7, 1) == second
    assert _order(many_groups, mode, 8, 0) != first


def test_none_is_file_order_and_validation_is_never_shuffled(many_groups):
    file_order = [i for g in _groups(many_groups) for i in g]
    assert _order(many_groups, "none", 0, 0) == _order(many_groups, "none", 0, 1) == file_order
    data = DataConfig(path=many_groups.path, shuffle="global")
    val = [i for b in iter_batches(data, many_groups, "val", batch_size=3, train=False, with_ids=True) for i in b["id"]]
    assert val == [i for f in many_groups.split_files("val") for i in pq.read_table(f).column("id").to_pylist()]


def test_files_keeps_each_row_group_together_and_local_mixes_them(many_groups):
    def together(order):  # each row group's rows next to each other, in their stored order
        at = {i: k for k, i in enumerate(order)}
        return all([at[i] for i in g] == list(range(at[g[0]], at[g[0]] + len(g))) for g in _groups(many_groups))

    assert together(_order(many_groups, "files", 3, 0)) and together(_order(many_groups, "files", 3, 1))
    assert not together(_order(many_groups, "local", 3, 0))


def test_buffer_is_at_least_a_batch_and_global_is_the_whole_split():
    assert Shuffle.of("local", 8, 32) == Shuffle(True, 32, True)
    assert Shuffle.of("local", 1024, 32) == Shuffle(True, 1024, True)
    assert Shuffle.of("files", 1024, 32) == Shuffle(True, 32, False)
    assert Shuffle.of("global", 1024, 32).window > 10**12
    assert Shuffle.of("global", 1024, 32, train=False) == Shuffle(False, 32, False) == Shuffle.of("none", 8, 32)
    assert Shuffle.default(32, True) == Shuffle.for_data(DataConfig(path="x"), 32, True)


@pytest.mark.parametrize("sets, message", [
    (["data.shuffle=random"],
     "data.shuffle: 'random' is not valid; choose one of 'files', 'local', 'global' or 'none'"),
    (["data.shuffle_buffer_rows=0"], "data.shuffle_buffer_rows"),
])
def test_bad_shuffle_settings_exit_2_naming_the_key(tiny_dir, capsys, sets, message):
    from mmray.cli.main import main

    args = ["validate", "jobs/quickstart.yaml", "--set", f"data.path={tiny_dir}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    assert message in capsys.readouterr().err

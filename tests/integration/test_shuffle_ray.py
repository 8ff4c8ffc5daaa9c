"""``data.shuffle`` on the Ray Data pipeline (real local Ray): under every mode each epoch yields every row of the
split exactly once, also split across 2 consumers as Ray Train splits it; the order is new each epoch and the
same for a seed. Rows are told apart by their decoded audio and tokens (augmentation touches only images)."""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import HANG_S

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ordered_ray(local_ray):
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True  # the order is the seed's, not the race's
    yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """80 rows in 3 shards, rewritten with 4-row row groups (the unit the order shuffles)."""
    out = tmp_path_factory.mktemp("shuffle") / "ds"
    synth(str(out), rows=80, shards=3, seed=5)
    info = read_dataset_info(str(out))
    for f in info.split_files("train"):
        pq.write_table(pq.read_table(f), f, row_group_size=4)
    return info


def _rows(batch) -> list[tuple]:
    return [(int(batch["label"][i]), tuple(np.asarray(batch["input_ids"][i]).tolist()),
             round(float(np.asarray(batch["audio"][i]).sum()), 3)) for i in range(len(batch["label"]))]


def _epochs(ds, n: int = 2, buffer=None) -> list[list[tuple]]:
    return [[r for b in ds.iter_batches(batch_size=8, batch_format="numpy", local_shuffle_buffer_size=buffer,
                                        local_shuffle_seed=epoch if buffer else None) for r in _rows(b)]
            for epoch in range(n)]


@pytest.mark.parametrize("mode", ["files", "local", "global", "none"])
def test_every_row_once_per_epoch_new_order_each_epoch_same_for_a_seed(ordered_ray, dataset, mode):
    from mmray.data.pipeline import build_dataset, local_shuffle_rows

    data = DataConfig(path=dataset.path, decode_batch_size=8, shuffle=mode, shuffle_buffer_rows=16)
    want = Counter(r for b in iter_batches(data, dataset, "train", batch_size=8, train=False) for r in _rows(b))
    assert len(want) == dataset.split_rows("train")  # every row told apart
    buffer = local_shuffle_rows(data, 8, train=True)
    assert (buffer is not None) == (mode == "local")
    epochs = _epochs(build_dataset(data, dataset, "train", train=True, seed=3), buffer=buffer)
    assert all(Counter(e) == want for e in epochs)
    if mode == "none":
        assert epochs[0] == epochs[1]
        return
    assert epochs[0] != epochs[1]
    assert _epochs(build_dataset(data, dataset, "train", train=True, seed=3), buffer=buffer) == epochs
    assert _epochs(build_dataset(data, dataset, "train", train=True, seed=4), n=1, buffer=buffer)[0] != epochs[0]


@pytest.mark.parametrize("mode", ["files", "global"])
def test_two_consumers_see_every_row_once_per_epoch(ordered_ray, dataset, mode):
    """As Ray Train hands a dataset to 2 workers: ``streaming_split(2)``, both consumed at once, 2 epochs."""
    from mmray.data.pipeline import build_dataset

    data = DataConfig(path=dataset.path, decode_batch_size=8, shuffle=mode)
    want = Counter(r for b in iter_batches(data, dataset, "train", batch_size=8, train=False) for r in _rows(b))
    splits = build_dataset(data, dataset, "train", train=True, seed=3).streaming_split(2)
    for _ in range(2):
        seen: list[list[tuple]] = [[], []]

        def consume(k, seen=seen):
            for b in splits[k].iter_batches(batch_size=8, batch_format="numpy"):
                seen[k] += _rows(b)

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=HANG_S)
        assert not any(t.is_alive() for t in threads)
        assert Counter(seen[0] + seen[1]) == want

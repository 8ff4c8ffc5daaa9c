"""The Ray Data pipeline yields the same rows and labels as the in-process reader (real local Ray)."""
from __future__ import annotations

import numpy as np
import pytest

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "ds"
    synth(str(out), rows=80, shards=3, seed=5)
    return read_dataset_info(str(out))


def _signature(batch: dict) -> list[tuple]:
    # One hashable row summary per row: label, presence flags and rounded content sums.
    rows = []
    for i in range(len(batch["label"])):
        rows.append((
            int(batch["label"][i]), bool(batch["valid"][i]),
            bool(batch["image_present"][i]), round(float(np.asarray(batch["image"][i]).sum()), 1),
            bool(batch["text_present"][i]), tuple(np.asarray(batch["input_ids"][i]).tolist()),
            bool(batch["audio_present"][i]), round(float(np.asarray(batch["audio"][i]).sum()), 2),
        ))
    return rows


@pytest.mark.parametrize("split", ["train", "val"])
def test_pipeline_matches_local_reader(local_ray, dataset, split):
    from mmray.data.pipeline import build_dataset

    data = DataConfig(path=dataset.path, decode_batch_size=16)
    local = [s for b in iter_batches(data, dataset, split, batch_size=16, train=False) for s in _signature(b)]
    ds = build_dataset(data, dataset, split, train=False)
    remote = [s for b in ds.iter_torch_batches(batch_size=16) for s in _signature(b)]
    assert len(remote) == dataset.split_rows(split)
    assert sorted(remote) == sorted(local)


def test_train_pipeline_yields_every_row_once(local_ray, dataset):
    from mmray.data.pipeline import build_dataset

    data = DataConfig(path=dataset.path, decode_batch_size=32)
    labels = [int(l) for b in build_dataset(data, dataset, "train", train=True, seed=1).iter_batches(batch_size=8)
              for l in b["label"]]
    local = [int(l) for b in iter_batches(data, dataset, "train", batch_size=8, train=False) for l in b["label"]]
    assert sorted(labels) == sorted(local)

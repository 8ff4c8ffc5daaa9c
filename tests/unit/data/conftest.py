"""A tiny synthetic dataset shared by the data tests (made once per session, 60 rows)."""
from __future__ import annotations

import pytest

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.synth import synth


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    synth(str(out), rows=60, shards=2, seed=0, command="mmray data synth --rows 60")
    return str(out)


@pytest.fixture(scope="session")
def tiny_info(tiny_dir):
    return read_dataset_info(tiny_dir)


@pytest.fixture()
def data_cfg(tiny_dir) -> DataConfig:
    return DataConfig(path=tiny_dir)

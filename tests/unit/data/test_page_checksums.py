"""Shards carry Parquet page checksums and are verified on read: random bytes written into the middle of a
shard (its footer intact) are reported by shard and row group and counted as bad records, never decoded as
if they were data; under ``on_bad_record: fail`` the run stops naming them."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from helpers import small_job

from mmray.config import validate_job
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import BadRecordError
from mmray.data.reader import iter_batches, row_group_units
from mmray.data.synth import synth


@pytest.fixture
def damaged(tmp_path):
    """A synth dataset whose first train shard has 4 KB of random bytes in the middle of its row group 1."""
    synth(str(tmp_path / "synth"), rows=600, shards=1, seed=0)
    info = read_dataset_info(str(tmp_path / "synth"))
    shard = info.split_files("train")[0]
    meta = pq.ParquetFile(shard).metadata
    assert meta.num_row_groups >= 2
    group = meta.row_group(1)
    start = min(group.column(i).data_page_offset for i in range(group.num_columns))
    middle = start + group.total_byte_size // 2
    with open(shard, "r+b") as f:
        f.seek(middle)
        f.write(os.urandom(4096))
    return info, shard, group.num_rows


def _config(info, on_bad_record: str):
    job = small_job(info.path, workers=1).model_dump(mode="json")
    job["data"]["on_bad_record"] = on_bad_record
    return validate_job(job)


def test_a_damaged_page_is_counted_as_bad_records_and_said_once(damaged, caplog):
    info, shard, rows = damaged
    config = _config(info, "skip")
    with caplog.at_level("WARNING"):
        batches = list(iter_batches(config.data, info, "train", batch_size=64, train=False))
    total = sum(len(b["valid"]) for b in batches)
    bad = sum(int((~b["valid"]).sum()) for b in batches)
    assert total == info.split_rows("train") and bad == rows  # the whole damaged row group, and only it
    said = [r.getMessage() for r in caplog.records if "damaged data" in r.getMessage()]
    assert len(said) == 1 and f"shard {shard}, row group 1 ({rows} rows)" in said[0]
    assert "checksum" in said[0].lower()


def test_under_on_bad_record_fail_the_damage_stops_the_run_naming_shard_and_row_group(damaged):
    info, shard, _ = damaged
    with pytest.raises(BadRecordError) as e:
        list(iter_batches(_config(info, "fail").data, info, "train", batch_size=64, train=False))
    assert f"damaged data in shard {shard}, row group 1" in str(e.value)


def test_the_footer_is_intact_so_the_start_checks_still_pass(damaged):
    info, shard, _ = damaged
    assert (shard, 1) in row_group_units(info, "train")

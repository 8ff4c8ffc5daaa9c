"""dataset.json parsing and the streaming shard writer."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from mmray.config.errors import UserError
from mmray.data.dataset_dir import ShardWriter, read_dataset_info, shard_schema, write_dataset_info


def test_info_round_trips_and_resolves_paths(tiny_info, tmp_path):
    assert tiny_info.num_classes() == 6
    assert all(os.path.isfile(f) for f in tiny_info.split_files("train"))
    assert tiny_info.tokenizer_path.endswith("tokenizer/tokenizer.json")
    from dataclasses import replace

    write_dataset_info(replace(tiny_info, path=str(tmp_path)))
    again = read_dataset_info(str(tmp_path))
    assert again.to_json() == tiny_info.to_json()


def test_missing_or_broken_dataset_json_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no dataset.json"):
        read_dataset_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_dataset_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": 1, "modalities": ["smell"]}))
    with pytest.raises(UserError, match="missing keys"):
        read_dataset_info(str(tmp_path))


def test_unknown_split_and_task_name_the_choices(tiny_info):
    with pytest.raises(UserError, match="train, val, test"):
        tiny_info.split_files("dev")
    with pytest.raises(UserError, match="label"):
        tiny_info.num_classes("label_color")


def test_shard_writer_rolls_shards_and_counts_present(tmp_path):
    schema = shard_schema(["image", "text"])
    w = ShardWriter(str(tmp_path), "train", schema, rows_per_shard=4, row_group_rows=3)
    for i in range(10):
        w.write({"id": f"x{i}", "label": i % 2, "image": b"\x00" if i % 3 else None, "text": f"t{i}"})
    split = w.close()
    assert split.rows == 10 and split.files == ("train/part-00000.parquet", "train/part-00001.parquet",
                                                "train/part-00002.parquet")
    assert [pq.ParquetFile(tmp_path / f).metadata.num_rows for f in split.files] == [4, 4, 2]
    assert dict(split.present) == {"image": 6, "text": 10}
    assert pq.read_schema(tmp_path / split.files[0]).names == ["id", "label", "image", "text"]

"""evaluate / predict_dataset / format_evaluation on a tiny export."""
from __future__ import annotations

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmray.config import UserError
from mmray.data.reader import iter_batches
from mmray.export import evaluate, format_evaluation, load_model, predict_dataset


@pytest.fixture
def model_dir(exported, tmp_path):
    """A private copy of the export: evaluate writes into it, other tests check the pristine one."""
    out = tmp_path / "export"
    shutil.copytree(exported.export_dir, out)
    return out


def _hand_count(exported, split):
    p = load_model(exported.export_dir)
    correct = total = 0
    for batch in iter_batches(exported.config.data, exported.info, split, batch_size=7, train=False):
        pred = p.predict_batch(batch).argmax(dim=1)
        correct += int((pred == batch["label"]).sum())
        total += batch["label"].shape[0]
    return correct, total


def test_evaluate_writes_json_and_png_and_counts_right(exported, model_dir):
    result = evaluate(model_dir, exported.data_dir, split="train", batch_size=16)
    correct, total = _hand_count(exported, "train")
    assert result["rows"] == total == exported.info.split_rows("train")
    assert result["skipped"] == 0
    assert result["accuracy"] == pytest.approx(correct / total)
    assert sum(map(sum, result["confusion"])) == total
    assert result["class_names"] == list(exported.info.class_names)
    assert {"precision", "recall", "f1"} <= set(result)

    saved = json.loads((model_dir / "eval-train.json").read_text())
    assert saved == result
    png = model_dir / "confusion-train.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()


def test_evaluate_unknown_split_is_a_user_error(exported, model_dir):
    with pytest.raises(UserError, match="nope"):
        evaluate(model_dir, exported.data_dir, split="nope")


def test_evaluate_counts_undecodable_records_as_skipped(exported, model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(exported.data_dir, data)
    shard = data / exported.info.splits["test"].files[0]
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[0] = b"not a png"
    table = table.set_column(table.schema.get_field_index("image"), "image", [images])
    pq.write_table(table, shard)
    result = evaluate(model_dir, data, split="test")
    assert result["skipped"] == 1
    assert result["rows"] == table.num_rows - 1


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_dataset_writes_one_row_per_id(exported, tmp_path, suffix):
    out = tmp_path / f"preds{suffix}"
    n = predict_dataset(exported.export_dir, exported.data_dir, "test", out)
    ids = pq.read_table(exported.info.split_files("test")[0]).column("id").to_pylist()
    if suffix == ".csv":
        with out.open() as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == len(ids)
    assert [r["id"] for r in rows] == ids
    assert set(rows[0]) == {"id", "label", "class_name", "probability"}
    p = load_model(exported.export_dir)
    batch = next(iter_batches(exported.config.data, exported.info, "test", batch_size=64, train=False))
    expected = p.predict_batch(batch).argmax(dim=1).tolist()
    assert [int(r["label"]) for r in rows] == expected
    assert all(r["class_name"] == p.class_names[int(r["label"])] for r in rows)


def test_format_evaluation_shows_metrics_and_named_confusion():
    result = {
        "split": "test", "rows": 8, "skipped": 1, "accuracy": 0.625, "precision": 0.6111, "recall": 0.6111,
        "f1": 0.6111, "confusion": [[2, 1, 0], [0, 1, 1], [1, 0, 2]], "class_names": ["cat", "dog", "a-very-long-class-name"],
    }
    text = format_evaluation(result)
    assert "accuracy" in text and "0.6250" in text and "1 skipped" in text
    assert "cat" in text and "dog" in text and "a-very-long…" in text
    matrix = [line.split()[1:] for line in text.splitlines()[-3:]]
    assert matrix == [["2", "1", "0"], ["0", "1", "1"], ["1", "0", "2"]]

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


def _hand_accuracy(predictor, batches, task="label", hide=()):
    import torch

    from mmray.train.evaluation import hide_modalities

    correct = total = 0
    for batch in batches:
        valid = batch["valid"].bool()
        with torch.inference_mode():
            logits = predictor.model(hide_modalities(batch, hide)).logits[task]
        correct += int((logits.argmax(1)[valid] == batch[task][valid]).sum())
        total += int(valid.sum())
    return correct / total


def test_evaluate_reports_each_modality_removed_and_alone(exported, model_dir):
    result = evaluate(model_dir, exported.data_dir, split="test")
    assert set(result["diagnostics"]) == {f"{k}_{m}" for k in ("without", "only") for m in ("audio", "image", "text")}
    p = load_model(model_dir)

    def batches():
        return iter_batches(exported.config.data, exported.info, "test", batch_size=16, train=False)
    assert result["diagnostics"]["without_image"]["accuracy"] == pytest.approx(_hand_accuracy(p, batches(), hide=("image",)))
    assert result["diagnostics"]["only_text"]["accuracy"] == pytest.approx(
        _hand_accuracy(p, batches(), hide=("audio", "image")))
    text = format_evaluation(result)
    assert "without image" in text and "only text" in text and "all: audio+image+text" in text

    from mmray.cli.main import main

    assert main(["evaluate", str(model_dir), "--data", str(exported.data_dir), "--no-diagnostics"]) == 0
    assert json.loads((model_dir / "eval-test.json").read_text())["diagnostics"] == {}


def test_evaluate_reports_metrics_per_task_of_a_multi_task_model(exported, tools, tmp_path):
    import pyarrow as pa

    from mmray.data.dataset_dir import read_dataset_info

    data = tmp_path / "data"
    shutil.copytree(exported.data_dir, data)
    for split in ("train", "val", "test"):  # a second task: the parity of the main label
        for shard in read_dataset_info(str(data)).split_files(split):
            table = pq.read_table(shard)
            parity = pa.array([v % 2 for v in table.column("label").to_pylist()], type=pa.int64())
            pq.write_table(table.append_column("label_parity", parity), shard)
    doc = json.loads((data / "dataset.json").read_text())
    doc["tasks"] = {"label": doc.get("class_names") or list(exported.info.class_names), "label_parity": ["even", "odd"]}
    (data / "dataset.json").write_text(json.dumps(doc))
    info = read_dataset_info(str(data))
    assert set(info.tasks) == {"label", "label_parity"}
    out = tools.build_and_export(tmp_path, tools.config(data), info, tmp_path / "export")
    result = evaluate(out.export_dir, data, split="test")
    parity = result["tasks"]["label_parity"]
    assert parity["class_names"] == ["even", "odd"]
    batches = iter_batches(out.config.data, info, "test", batch_size=16, train=False)
    assert parity["accuracy"] == pytest.approx(_hand_accuracy(load_model(out.export_dir), batches, "label_parity"))
    header = format_evaluation(result).splitlines()[2]
    assert header.split() == ["metric", "label", "label_parity"]


def _no_decoding(self, batch):
    raise AssertionError("decoded a shard row although the decoded-input cache holds it")


@pytest.mark.parametrize("built_with", ["skip", "fail"])
def test_evaluate_and_predict_read_the_decoded_input_cache_with_the_same_results(tools, tmp_path, monkeypatch,
                                                                               built_with):
    """A run's decoded-input cache (built with the job's on_bad_record, either one) serves evaluate and predict,
    which skip bad records: the same metrics and the same predictions, row by row, without decoding a row."""
    from mmray.data import decoded
    from mmray.data.decode import Preprocessor
    from mmray.data.synth import synth

    info = synth(out=str(tmp_path / "data"), rows=60, shards=2, seed=1)
    config = tools.config(tmp_path / "data")
    ex = tools.build_and_export(tmp_path, config, info, tmp_path / "export")
    raw = evaluate(ex.export_dir, ex.data_dir, "test", batch_size=7)
    predict_dataset(ex.export_dir, ex.data_dir, "val", tmp_path / "raw.jsonl", batch_size=7)
    assert not decoded.list_decoded(str(ex.data_dir))  # evaluating builds nothing

    trained = config.model_copy(update={"data": config.data.model_copy(update={"on_bad_record": built_with})})
    assert decoded.plan(trained, info, build=True, runner="local").used
    monkeypatch.setattr(Preprocessor, "decode", _no_decoding)
    cached = evaluate(ex.export_dir, ex.data_dir, "test", batch_size=7)
    predict_dataset(ex.export_dir, ex.data_dir, "val", tmp_path / "cached.jsonl", batch_size=7)
    assert cached["rows"] == raw["rows"] > 0 and cached["confusion"] == raw["confusion"]
    for key in ("loss", "accuracy", "f1", "skipped"):
        assert cached[key] == pytest.approx(raw[key], abs=1e-6), key
    assert cached["diagnostics"].keys() == raw["diagnostics"].keys()
    for variant, scores in raw["diagnostics"].items():
        assert cached["diagnostics"][variant] == pytest.approx(scores, abs=1e-6), variant
    assert (tmp_path / "cached.jsonl").read_text() == (tmp_path / "raw.jsonl").read_text()


def test_evaluate_decodes_when_the_cache_is_off_for_the_export(tools, tmp_path, monkeypatch):
    from mmray.data import decoded
    from mmray.data.decode import Preprocessor
    from mmray.data.synth import synth

    info = synth(out=str(tmp_path / "data"), rows=30, shards=1, seed=2)
    config = tools.config(tmp_path / "data")
    assert decoded.plan(config, info, build=True, runner="local").used
    off = config.model_copy(update={"data": config.data.model_copy(update={"decode_cache": "off"})})
    ex = tools.build_and_export(tmp_path, off, info, tmp_path / "export")
    calls = []
    original = Preprocessor.decode
    monkeypatch.setattr(Preprocessor, "decode", lambda self, batch: calls.append(1) or original(self, batch))
    assert evaluate(ex.export_dir, ex.data_dir, "test")["rows"] > 0
    assert calls  # data.decode_cache: off is honoured by evaluation too

"""`mmray data synth`: deterministic, real media, consistent dataset.json, labels recoverable only jointly."""
from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmray.config.errors import UserError
from mmray.data.synth import CLASS_NAMES, PITCH_WORDS, SHAPE_WORDS, split_of, synth


def _shard_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for split in ("train", "val", "test"):
        for name in sorted(os.listdir(os.path.join(root, split))):
            with open(os.path.join(root, split, name), "rb") as f:
                out[f"{split}/{name}"] = f.read()
    return out


def _rows(root: str, split: str) -> list[dict]:
    info = json.load(open(os.path.join(root, "dataset.json")))
    rows = []
    for f in info["splits"][split]["files"]:
        rows += pq.read_table(os.path.join(root, f)).to_pylist()
    return rows


def test_same_seed_gives_byte_identical_shards(tmp_path, tiny_dir):
    again = synth(str(tmp_path / "again"), rows=60, shards=2, seed=0)
    assert _shard_bytes(again.path) == _shard_bytes(tiny_dir)
    assert open(os.path.join(again.path, "tokenizer/tokenizer.json")).read() == open(
        os.path.join(tiny_dir, "tokenizer/tokenizer.json")
    ).read()


def test_different_seeds_give_different_data(tmp_path, tiny_dir):
    other = synth(str(tmp_path / "other"), rows=60, shards=2, seed=1)
    a, b = _shard_bytes(tiny_dir), _shard_bytes(other.path)
    assert a.keys() == b.keys()  # split is by id hash, so file layout matches
    assert all(a[k] != b[k] for k in a)


def test_dataset_json_matches_the_shards(tiny_dir):
    doc = json.load(open(os.path.join(tiny_dir, "dataset.json")))
    assert doc["schema_version"] == 1
    assert doc["modalities"] == ["audio", "image", "text"]
    assert doc["class_names"] == list(CLASS_NAMES) and len(CLASS_NAMES) == 6
    assert doc["tasks"] == {"label": list(CLASS_NAMES)}
    assert doc["tokenizer"] == "tokenizer/tokenizer.json"
    assert os.path.isfile(os.path.join(tiny_dir, doc["tokenizer"]))
    assert doc["media"]["audio"] == {"format": "wav", "sample_rate": 16000}
    assert doc["created"]["source"] == "synth" and doc["created"]["command"] == "mmray data synth --rows 60"
    assert doc["rejected"] == {"rows": 0, "by_reason": {}}
    assert sum(s["rows"] for s in doc["splits"].values()) == 60
    ids = set()
    for split, s in doc["splits"].items():
        rows = _rows(tiny_dir, split)
        assert len(rows) == s["rows"] > 0
        assert 1 <= len(s["files"]) <= 2
        for m in ("audio", "image", "text"):
            assert s["present"][m] == sum(r[m] is not None for r in rows)
        for r in rows:
            assert split_of(r["id"], 0.1, 0.1) == split
            assert 0 <= r["label"] < 6
            ids.add(r["id"])
    assert len(ids) == 60


def test_media_are_real_png_and_wav(tiny_dir):
    rows = [r for r in _rows(tiny_dir, "train") if r["image"] is not None and r["audio"] is not None][:5]
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert (img.format, img.size, img.mode) == ("PNG", (64, 64), "RGB")
        info = sf.info(io.BytesIO(r["audio"]))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 16000, 1)
        assert info.duration == pytest.approx(1.0)


def test_text_never_hints_at_a_wrong_class(tiny_dir):
    hinted = 0
    for r in _rows(tiny_dir, "train"):
        if r["text"] is None:
            continue
        shape, pitch = CLASS_NAMES[r["label"]].split("-")
        text = r["text"].lower()
        for other, words in SHAPE_WORDS.items():
            if other != shape:
                assert not any(w in text for w in words), (r["text"], CLASS_NAMES[r["label"]])
        for other, words in PITCH_WORDS.items():
            if other != pitch:
                assert not any(w in text for w in words), (r["text"], CLASS_NAMES[r["label"]])
        hinted += any(w in text for w in SHAPE_WORDS[shape])
    assert hinted > 0


def test_missing_fraction_controls_null_cells(tmp_path):
    full = synth(str(tmp_path / "full"), rows=30, shards=1, seed=3, missing_fraction=0.0)
    assert all(full.splits[s].present[m] == full.splits[s].rows for s in full.splits for m in full.modalities)
    holes = synth(str(tmp_path / "holes"), rows=30, shards=1, seed=3, missing_fraction=0.5)
    assert sum(holes.splits["train"].present.values()) < 3 * holes.splits["train"].rows
    assert all(r["image"] or r["audio"] or r["text"] for r in _rows(holes.path, "train"))


@pytest.mark.parametrize(
    "kwargs, word",
    [({"rows": 0}, "--rows"), ({"shards": 0}, "--shards"), ({"val_fraction": 0.6, "test_fraction": 0.5}, "fraction")],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, word):
    args = {"rows": 10, "shards": 1, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=word):
        synth(str(tmp_path / "bad"), **args)

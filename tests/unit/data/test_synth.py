"""`mmray data synth`: deterministic, real media, consistent dataset.json, labels recoverable only jointly."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image
from storage_fixtures import s3_bucket  # noqa: F401  (fixture)

from mmray.config.errors import UserError
from mmray.data.dataset_dir import ShardWriter, check_shards, read_dataset_info, shard_schema
from mmray.data.decode import image_pixels, read_audio
from mmray.data.inspect import inspect_dataset
from mmray.data.synth import CLASS_NAMES, PITCH_WORDS, SHAPE_WORDS, Media, _row, split_of, synth


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
    assert doc["media"] == {"image": {"format": "png", "size": 64},
                            "audio": {"format": "wav", "sample_rate": 16000, "seconds": 1.0}}
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


def _content(index: int) -> tuple:
    """Row ``index`` of seed 0 as the label, the text and the decoded pixels and samples (not the encoded bytes,
    which a zlib or libsndfile upgrade may change without changing the data)."""
    r = _row(0, index, 0.03)
    pixels = np.asarray(Image.open(io.BytesIO(r["image"])))
    samples, _ = sf.read(io.BytesIO(r["audio"]), dtype="int16")
    return (r["label"], *(hashlib.sha256(b).hexdigest()[:16]
                          for b in (r["text"].encode(), pixels.tobytes(), samples.tobytes())))


def test_the_default_rows_are_the_ones_every_earlier_version_made():
    """Trained models, benchmarks and the quickstart's figures rest on these rows: new media options must not move them."""
    assert [_content(i) for i in range(3)] == [
        (5, "8ba7d237fdb20d46", "c9da08903a841b44", "6a3285824fcf5d3f"),
        (3, "c313ebdc41bd55b8", "e3af7ea9e1b259d5", "79aa7c272781f846"),
        (5, "7eeb85a1cb0cab27", "700edcd476629cae", "a7c0810e9b378ea5"),
    ]


def test_a_pool_of_workers_writes_the_same_bytes_as_one_process(tmp_path, tiny_dir):
    pooled = synth(str(tmp_path / "pooled"), rows=60, shards=2, seed=0, workers=2)
    assert _shard_bytes(pooled.path) == _shard_bytes(tiny_dir)  # tiny_dir: 60 rows, written in this process
    assert json.load(open(os.path.join(pooled.path, "dataset.json")))["splits"] == \
        json.load(open(os.path.join(tiny_dir, "dataset.json")))["splits"]


def test_realistic_media_have_the_declared_size_format_and_length(tmp_path):
    info = synth(str(tmp_path / "big"), rows=12, shards=2, seed=0, missing_fraction=0.0, workers=2,
                 media=Media(image_size=224, image_format="jpeg", audio_seconds=10.0, sample_rate=16000))
    doc = json.load(open(os.path.join(info.path, "dataset.json")))
    assert doc["media"] == {"image": {"format": "jpeg", "size": 224},
                            "audio": {"format": "wav", "sample_rate": 16000, "seconds": 10.0}}
    rows = [r for s in ("train", "val", "test") for r in _rows(info.path, s)]
    assert len(rows) == 12
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert (img.format, img.size, img.mode) == ("JPEG", (224, 224), "RGB")
        assert image_pixels(r["image"], 224).shape == (224, 224, 3)  # the training decoder reads it
        a = sf.info(io.BytesIO(r["audio"]))
        assert (a.format, a.subtype, a.samplerate, a.channels, a.frames) == ("WAV", "PCM_16", 16000, 1, 160_000)
        wave, rate = read_audio(r["audio"], 10.0)
        assert rate == 16000 and len(wave) == 160_000 and np.abs(wave).max() > 0.05
    reread = read_dataset_info(info.path)
    assert check_shards(reread, reread.modalities, required=()) == {s: reread.split_rows(s) for s in reread.splits}
    report = inspect_dataset(info.path)
    assert "synth" in report and "train" in report


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_each_image_format_at_another_size_and_rate(tmp_path, fmt, pil):
    media = Media(image_size=48, image_format=fmt, audio_seconds=0.5, sample_rate=8000)
    info = synth(str(tmp_path / fmt), rows=8, shards=1, seed=1, missing_fraction=0.0, media=media)
    for r in _rows(info.path, "train"):
        assert Image.open(io.BytesIO(r["image"])).format == pil and Image.open(io.BytesIO(r["image"])).size == (48, 48)
        a = sf.info(io.BytesIO(r["audio"]))
        assert (a.samplerate, a.frames) == (8000, 4000)
    again = synth(str(tmp_path / f"{fmt}-again"), rows=8, shards=1, seed=1, missing_fraction=0.0, media=media)
    assert _shard_bytes(again.path) == _shard_bytes(info.path)


def test_a_shard_too_large_for_one_file_continues_in_numbered_files(tmp_path):
    rows = [{"id": f"r{i}", "label": 0, "audio": b"x" * 1000, "image": None, "text": "t"} for i in range(6)]
    with ShardWriter(str(tmp_path), "train", shard_schema(["audio", "image", "text"]), max_shard_bytes=1,
                     row_group_rows=2, stem="part-00003") as w:
        for r in rows:
            w.write(r)
    assert w.files == ["train/part-00003.parquet", "train/part-00003-001.parquet", "train/part-00003-002.parquet"]
    assert [r for f in w.files for r in pq.read_table(tmp_path / f).column("id").to_pylist()] == \
        [r["id"] for r in rows]


def test_writing_over_an_old_dataset_leaves_none_of_its_shards(tmp_path):
    out = str(tmp_path / "d")
    synth(out, rows=40, shards=4, seed=0)
    info = synth(out, rows=20, shards=1, seed=0)
    for split in ("train", "val", "test"):
        assert sorted(os.listdir(os.path.join(out, split))) == \
            sorted(os.path.basename(f) for f in info.splits[split].files)


@pytest.mark.parametrize("media, flag", [
    (Media(image_format="gif"), "--image-format: 'gif'; choose one of jpeg, png, webp"),
    (Media(image_size=8), "--image-size: 8; must be from 16 to 2048"),
    (Media(audio_seconds=0), "--audio-seconds: 0; must be from 0.1 to 60"),
    (Media(sample_rate=100), "--sample-rate: 100; must be from 8000 to 48000"),
])
def test_bad_media_settings_name_the_flag_and_write_nothing(tmp_path, media, flag):
    with pytest.raises(UserError, match=flag):
        synth(str(tmp_path / "bad"), rows=10, shards=1, seed=0, media=media)
    assert not (tmp_path / "bad").exists()


def test_worker_processes_write_straight_to_an_object_store(s3_bucket, tmp_path, tiny_dir):  # noqa: F811
    from mmray import storage

    uri = f"{s3_bucket}/synth"
    info = synth(uri, rows=60, shards=2, seed=0, workers=2)
    assert info.path == uri and read_dataset_info(uri).splits == info.splits
    for split in ("train", "val", "test"):
        for f in info.splits[split].files:  # the same bytes as the local, one-process dataset
            assert storage.read_bytes(storage.join(uri, f)) == open(os.path.join(tiny_dir, f), "rb").read()
    assert storage.is_file(storage.join(uri, "tokenizer/tokenizer.json"))
    assert check_shards(read_dataset_info(uri), info.modalities)["train"] == info.split_rows("train")

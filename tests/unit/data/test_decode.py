"""Decoding shard rows: shapes, normalisation, resampling, missing modalities and bad records."""
from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmray.config.schema import AudioPreprocess, DataConfig, ImagePreprocess
from mmray.data.decode import BadRecordError, Preprocessor, decode_audio, decode_image, model_row_bytes


def _png(rgb=(128, 128, 128), size=(40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def _wav(freq=440.0, rate=16000, seconds=1.0, channels=1) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _batch(tiny_info, n=16) -> dict:
    table = pq.read_table(tiny_info.split_files("train")[0]).slice(0, n)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _raw(n, **columns):
    batch = {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "label": np.zeros(n, dtype=np.int64)}
    for name, values in columns.items():
        col = np.empty(n, dtype=object)
        col[:] = values
        batch[name] = col
    return batch


def test_batch_has_the_documented_shapes_and_dtypes(data_cfg, tiny_info):
    out = Preprocessor(data_cfg, tiny_info, train=False)(_batch(tiny_info))
    expect = {
        "label": ((16,), np.int64),
        "valid": ((16,), np.bool_),
        "image": ((16, 3, 32, 32), np.float32),
        "image_present": ((16,), np.bool_),
        "input_ids": ((16, 32), np.int64),
        "attention_mask": ((16, 32), np.int64),
        "text_present": ((16,), np.bool_),
        "audio": ((16, 8000), np.float32),
        "audio_present": ((16,), np.bool_),
    }
    assert {k: (v.shape, v.dtype.type) for k, v in out.items()} == expect
    assert out["valid"].all()


@pytest.mark.parametrize("update", [{}, {"modalities": ("image",)}, {"modalities": ("text", "audio")},
                                    {"image": ImagePreprocess(size=64), "audio": AudioPreprocess(seconds=2.0)}])
def test_model_row_bytes_is_what_a_batch_takes(data_cfg, tiny_info, update):
    """The Ray pipeline sizes its output blocks from it (one block per decode batch)."""
    data = data_cfg.model_copy(update=update)
    out = Preprocessor(data, tiny_info, train=False)(_batch(tiny_info))
    assert model_row_bytes(data, tiny_info) * 16 == sum(v.nbytes for v in out.values())


def test_only_configured_modalities_appear(tiny_dir, tiny_info):
    cfg = DataConfig(path=tiny_dir, modalities=["image"])
    out = Preprocessor(cfg, tiny_info, train=False)(_batch(tiny_info))
    assert set(out) == {"label", "valid", "image", "image_present"}


def test_image_is_resized_and_normalised():
    cfg = ImagePreprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = decode_image(_png((255, 0, 128)), cfg)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25], rtol=1e-5)


def test_audio_is_mono_resampled_and_fitted_to_length():
    cfg = AudioPreprocess(sample_rate=8000, seconds=1.0)
    stereo_44k = decode_audio(_wav(440, rate=44100, channels=2), cfg)
    assert stereo_44k.shape == (8000,) and stereo_44k.dtype == np.float32
    # The tone survives resampling: its spectrum peaks at 440 Hz.
    spectrum = np.abs(np.fft.rfft(stereo_44k))
    assert abs(np.argmax(spectrum) * 8000 / len(stereo_44k) - 440) < 2
    short = decode_audio(_wav(440, rate=8000, seconds=0.25), cfg)
    assert np.abs(short[:2000]).max() > 0.3 and not short[2100:].any()  # zero-padded
    long = decode_audio(_wav(440, rate=16000, seconds=3.0), cfg)
    assert long.shape == (8000,)  # cropped


def test_mixed_sample_rates_in_one_batch(data_cfg, tiny_info):
    batch = _raw(3, audio=[_wav(300, 16000), _wav(300, 22050), _wav(300, 8000)])
    cfg = DataConfig(path=data_cfg.path, modalities=["audio"])
    out = Preprocessor(cfg, tiny_info, train=False)(batch)
    assert out["audio_present"].all()
    # Same tone at three rates -> nearly the same waveform after resampling.
    np.testing.assert_allclose(out["audio"][0, 100:7900], out["audio"][2, 100:7900], atol=0.05)
    np.testing.assert_allclose(out["audio"][1, 100:7900], out["audio"][2, 100:7900], atol=0.05)


def test_text_is_tokenised_padded_and_masked(data_cfg, tiny_info):
    cfg = DataConfig(path=data_cfg.path, modalities=["text"], text={"max_length": 8})
    out = Preprocessor(cfg, tiny_info, train=False)(_raw(2, text=["the sound was shrill", "a " * 40]))
    assert out["input_ids"].shape == (2, 8)
    assert out["attention_mask"][0].tolist() == [1] * 6 + [0] * 2  # [CLS] 4 words [SEP] pad pad
    assert out["attention_mask"][1].all()  # truncated to max_length
    assert (out["input_ids"][0, 6:] == 0).all()


def test_missing_modality_gives_zeros_and_present_false(data_cfg, tiny_info):
    batch = _raw(2, image=[_png(), None], text=["hello", None], audio=[None, _wav()])
    out = Preprocessor(data_cfg, tiny_info, train=False)(batch)
    assert out["valid"].all()
    assert out["image_present"].tolist() == [True, False] and not out["image"][1].any()
    assert out["text_present"].tolist() == [True, False]
    assert not out["input_ids"][1].any() and not out["attention_mask"][1].any()
    assert out["audio_present"].tolist() == [False, True] and not out["audio"][0].any()


def test_corrupt_record_is_skipped_with_a_warning_naming_it(data_cfg, tiny_info, caplog):
    batch = _raw(3, image=[_png(), b"not a png", _png()], text=["a", "b", "c"], audio=[_wav(), _wav(), b"RIFFjunk"])
    with caplog.at_level(logging.WARNING, logger="mmray.data"):
        out = Preprocessor(data_cfg, tiny_info, train=False)(batch)
    assert out["valid"].tolist() == [True, False, False]
    assert not out["image"][1].any() and not out["audio"][1].any() and not out["attention_mask"][1].any()
    assert out["image_present"].tolist() == [True, False, False]  # an invalid row is all zeros
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'r1'" in messages and "image" in messages and "'r2'" in messages and "audio" in messages


def test_corrupt_record_fails_with_its_id_when_configured(tiny_dir, tiny_info):
    cfg = DataConfig(path=tiny_dir, on_bad_record="fail")
    batch = _raw(2, image=[_png(), b"\x89PNG garbage"], text=["a", "b"], audio=[_wav(), _wav()])
    with pytest.raises(BadRecordError, match="'r1'.*'image'") as err:
        Preprocessor(cfg, tiny_info, train=False)(batch)
    assert err.value.record_id == "r1" and err.value.column == "image"


def test_out_of_range_label_is_a_bad_record(data_cfg, tiny_info, caplog):
    batch = _raw(2, image=[_png(), _png()], text=["a", "b"], audio=[_wav(), _wav()])
    batch["label"] = np.array([1, 9])
    with caplog.at_level(logging.WARNING, logger="mmray.data"):
        out = Preprocessor(data_cfg, tiny_info, train=False)(batch)
    assert out["valid"].tolist() == [True, False]
    assert "'r1'" in caplog.text and "label 9" in caplog.text


def test_augmentation_only_in_training_and_seeded(data_cfg, tiny_info):
    batch = _batch(tiny_info, 8)
    plain = Preprocessor(data_cfg, tiny_info, train=False)(batch)["image"]
    assert np.array_equal(plain, Preprocessor(data_cfg, tiny_info, train=False)(batch)["image"])
    aug_a = Preprocessor(data_cfg, tiny_info, train=True, seed=1)(batch)["image"]
    aug_b = Preprocessor(data_cfg, tiny_info, train=True, seed=1)(batch)["image"]
    assert np.array_equal(aug_a, aug_b) and not np.array_equal(aug_a, plain)
    no_aug = DataConfig(path=data_cfg.path, image={"augment": False})
    assert np.array_equal(Preprocessor(no_aug, tiny_info, train=True)(batch)["image"], plain)


def test_from_raw_decodes_user_inputs(data_cfg, tiny_info):
    pre = Preprocessor(data_cfg, tiny_info, train=False)
    out = pre.from_raw(images=[_png(), None], texts=["a boxy thing", "shrill"])
    assert "label" not in out
    assert out["image_present"].tolist() == [True, False]
    assert out["text_present"].tolist() == [True, True]
    assert out["audio_present"].tolist() == [False, False] and out["audio"].shape == (2, 8000)


def test_modality_not_in_dataset_is_a_user_error(tmp_path, tiny_info):
    from dataclasses import replace

    from mmray.config.errors import UserError

    only_image = replace(tiny_info, modalities=("image",))
    with pytest.raises(UserError, match="audio"):
        Preprocessor(DataConfig(path=str(tmp_path)), only_image, train=False)

"""A folder of real PNG/JPEG/BMP/WAV/FLAC files and captions with planted faults, and its manifest in three forms.

Good rows carry the built-in dataset's media (shape in the image, pitch in the audio, hints in the
caption), so a model trained on the prepared folder can learn them. ``FAULTS`` lists every planted
fault: id -> (field, reason, outcome) that ``data prepare`` must record for it.
"""
from __future__ import annotations

import io
import json
import os
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image

from mmray.data.synth import CLASS_NAMES, PITCHES, SHAPES, _audio, _image, _text

# id -> (field, reason, outcome) expected in rejected.jsonl
FAULTS = {
    "f-trunc-png": ("image", "cannot decode image", "missing"),
    "f-trunc-jpg": ("image", "cannot decode image", "missing"),
    "f-garbage-jpg": ("image", "cannot decode image", "missing"),
    "f-png-noload": ("image", "cannot decode image", "missing"),
    "f-missing-img": ("image", "missing file", "missing"),
    "f-zero-wav": ("audio", "audio has no samples", "missing"),
    "f-empty-flac": ("audio", "empty file", "missing"),
    "f-missing-wav": ("audio", "missing file", "missing"),
    "f-empty-caption": ("text", "empty text", "missing"),
    "f-bad-label": ("label", "label is not an integer", "rejected"),
    "f-empty-label": ("label", "empty label", "rejected"),
    "f-nothing": ("row", "no usable modality", "rejected"),
}
DUPLICATE_OF = "g-00001"  # a second row with this id is planted; it must be rejected as "duplicate id"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _reencode(png: bytes, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _flac(wav: bytes) -> bytes:
    data, rate = sf.read(io.BytesIO(wav), dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC")
    return buf.getvalue()


def _zero_frame_wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    return buf.getvalue()


def _png_that_opens_but_does_not_load(png: bytes) -> bytes:
    bad = bytearray(png)
    start = png.index(b"IDAT") + 20
    for k in range(start, start + 40):  # corrupt the compressed pixels, keep the header chunks intact
        bad[k] ^= 0xFF
    bad = bytes(bad)
    Image.open(io.BytesIO(bad))  # opens fine...
    try:
        Image.open(io.BytesIO(bad)).load()
    except OSError:
        return bad  # ...and fails to load
    raise AssertionError("the planted PNG loaded")


def make_folder(root: str, good_rows: int = 120, seed: int = 0) -> dict:
    """Write media under ``root/media`` and return ``{"rows": [...], "good": {id: {...}}}``.

    Each manifest row is ``{"id", "img", "caption", "sound", "y"}`` (paths relative to ``root``);
    ``good`` holds each good row's label, caption and the exact bytes of its files.
    """
    media = os.path.join(root, "media")
    os.makedirs(media, exist_ok=True)

    def put(name: str, data: bytes) -> str:
        with open(os.path.join(media, name), "wb") as f:
            f.write(data)
        return f"media/{name}"

    rows, good = [], {}
    for i in range(good_rows):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(CLASS_NAMES)))
        shape, pitch = SHAPES[label // 2], PITCHES[label % 2]
        png, wav = _image(rng, shape), _audio(rng, pitch)
        img = png if i % 3 == 0 else _reencode(png, "JPEG") if i % 3 == 1 else _reencode(png, "BMP")
        ext = ("png", "jpg", "bmp")[i % 3]
        snd = wav if i % 2 == 0 else _flac(wav)
        rid = f"g-{i:05d}"
        row = {"id": rid, "img": put(f"{rid}.{ext}", img), "caption": _text(rng, shape, pitch),
               "sound": put(f"{rid}.{'wav' if i % 2 == 0 else 'flac'}", snd), "y": label}
        if i == 7:  # an absolute path works too
            row["img"] = os.path.join(root, row["img"])
        rows.append(row)
        good[rid] = {"label": label, "text": row["caption"], "image": img, "audio": snd, "image_format": ext}

    base = rows[0]
    png, wav = good["g-00000"]["image"], good["g-00000"]["audio"]
    jpg = _reencode(png, "JPEG")

    def fault(rid: str, **over) -> None:
        rows.append({**base, "id": rid, **over})

    fault("f-trunc-png", img=put("trunc.png", png[: len(png) // 2]))
    fault("f-trunc-jpg", img=put("trunc.jpg", jpg[: len(jpg) // 2]))
    fault("f-garbage-jpg", img=put("garbage.jpg", bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8))))
    fault("f-png-noload", img=put("noload.png", _png_that_opens_but_does_not_load(png)))
    fault("f-missing-img", img="media/no-such-image.png")
    fault("f-zero-wav", sound=put("zero.wav", _zero_frame_wav()))
    fault("f-empty-flac", sound=put("empty.flac", b""))
    fault("f-missing-wav", sound="media/no-such-sound.wav")
    fault("f-empty-caption", caption="   ")
    fault("f-bad-label", y="cat")
    fault("f-empty-label", y="")
    fault("f-nothing", img="media/no-such-image.png", sound=put("zero2.wav", _zero_frame_wav()), caption="")
    rows.append({**rows[1], "id": DUPLICATE_OF})
    return {"rows": rows, "good": good}


def write_manifest(root: str, rows: list[dict], form: str) -> str:
    """The manifest as ``manifest.csv`` / ``.jsonl`` / ``.parquet`` in ``root``; returns its path."""
    path = os.path.join(root, f"manifest.{form}")
    if form == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif form == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:  # Parquet needs one type per column: labels as strings ("3", "cat", "")
        cols = {k: [r[k] if k != "y" else str(r[k]) for r in rows] for k in rows[0]}
        pq.write_table(pa.table(cols), path)
    return path

"""Decoding raw shard rows into model-ready arrays (pure numpy/torch, no Ray).

:class:`Preprocessor` turns a numpy batch of shard columns (as Ray Data's ``batch_format="numpy"``
or the local reader gives it) into the batch format the models consume:

- ``label`` (and ``label_<task>``): int64 [B]
- ``valid``: bool [B]; False = the record failed to decode and was skipped (its inputs are zeros)
- ``image``: float32 [B, 3, S, S], normalised with ``data.image.mean/std``; ``image_present``: bool [B]
- ``input_ids``, ``attention_mask``: int64 [B, L]; ``text_present``: bool [B]
- ``audio``: float32 [B, N] mono at ``data.audio.sample_rate``; ``audio_present``: bool [B]

Only the modalities in ``data.modalities`` appear. A null cell (a missing modality) gives zeros and
``<modality>_present = False``. Batches of the Ray Data pipeline also carry ``row_key``: int64 [B], each row's
:func:`row_keys` (the loop sums them per epoch to show that every row was seen once).
"""
from __future__ import annotations

import io
import json
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from mmray.config.errors import RunError, UserError
from mmray.config.schema import AudioPreprocess, DataConfig, ImagePreprocess
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.tokenizer import TextTokenizer

log = logging.getLogger("mmray.data")

# Random shift of training images, as a fraction of the image side.
SHIFT_FRACTION = 0.125
BRIGHTNESS_JITTER = 0.2


ROW_KEY = "row_key"


def row_keys(ids: Sequence[Any]) -> np.ndarray:
    """int64 [B]: the CRC-32 of each row id (as text). Summed over an epoch's rows, it is the same number
    whatever their order or split across workers, and differs (but for a 1 in 2^32 chance) when a row is
    missing, seen twice, or replaced by another."""
    import zlib

    return np.fromiter((zlib.crc32(str(i).encode()) for i in ids), dtype=np.int64, count=len(ids))


# An extra input column the reader adds to the rows of a row group whose pages could not be read (a page
# checksum mismatch, a damaged page): "<column>: <what and where>", None on sound rows.
DAMAGED = "_damaged"


class BadRecordError(RunError):
    """A record could not be decoded and ``data.on_bad_record`` is ``fail`` (a run-time failure: exit 1)."""

    def __init__(self, record_id: str, column: str, reason: str):
        self.record_id, self.column, self.reason = record_id, column, reason
        super().__init__(
            f"bad record {record_id!r}: column {column!r}: {reason} "
            "(set data.on_bad_record: skip to count and skip such records)"
        )

    def __reduce__(self):  # pickles across Ray workers
        return (type(self), (self.record_id, self.column, self.reason))


# ------------------------------------------------------------------------------ single items
def image_pixels(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG/WebP...) to RGB uint8 [S, S, 3], resized to ``size``.

    Raises:
        Exception: whatever PIL raises for bytes that are not an image.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale directly; no-op otherwise
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def decode_image(data: bytes, cfg: ImagePreprocess) -> np.ndarray:
    """Encoded image bytes -> float32 [3, S, S] normalised with ``cfg.mean/std`` (no augmentation)."""
    return _normalise(image_pixels(data, cfg.size)[None], cfg)[0]


def _normalise(pixels: np.ndarray, cfg: ImagePreprocess) -> np.ndarray:
    """uint8 or float [B, S, S, 3] in 0..255 -> float32 [B, 3, S, S] normalised."""
    mean = np.asarray(cfg.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(cfg.std, dtype=np.float32) * 255.0)
    x = (pixels.astype(np.float32) - mean) * inv_std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def read_audio(data: bytes, seconds: float) -> tuple[np.ndarray, int]:
    """Decode encoded audio (WAV/FLAC/OGG) to mono float32 [n] at its own rate, reading at most ``seconds``.

    Returns:
        ``(waveform, sample_rate)``.

    Raises:
        Exception: whatever soundfile raises for bytes that are not audio.
    """
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        need = math.ceil(seconds * rate)
        frames = f.read(need if f.frames <= 0 else min(need, f.frames), dtype="float32", always_2d=True)
    if frames.shape[0] == 0:
        raise ValueError("audio has no samples")
    return frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0], rate


def _resample_batch(waves: list[np.ndarray], rate: int, cfg: AudioPreprocess) -> np.ndarray:
    """Same-rate waveforms -> float32 [b, N] at ``cfg.sample_rate``, in one resample call."""
    n_src = math.ceil(cfg.seconds * rate)
    x = np.zeros((len(waves), n_src), dtype=np.float32)
    for i, w in enumerate(waves):
        x[i, : len(w)] = w[:n_src]
    if rate != cfg.sample_rate:
        import torch
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(x), rate, cfg.sample_rate).numpy()
    n = cfg.num_samples
    if x.shape[1] >= n:
        return np.ascontiguousarray(x[:, :n])
    return np.pad(x, ((0, 0), (0, n - x.shape[1])))


def decode_audio(data: bytes, cfg: AudioPreprocess) -> np.ndarray:
    """Encoded audio bytes -> mono float32 [N] at ``cfg.sample_rate``, cropped or zero-padded to ``cfg.num_samples``."""
    wave, rate = read_audio(data, cfg.seconds)
    return _resample_batch([wave], rate, cfg)[0]


# ------------------------------------------------------------------------------ batches
def model_row_bytes(data: DataConfig, info: DatasetInfo) -> int:
    """Bytes one row takes in a model batch (what :meth:`Preprocessor.__call__` returns): int64 labels, float32
    images and audio, int64 token ids and masks, bool flags."""
    row = 8 * len(info.tasks) + 1  # label columns, valid
    if "image" in data.modalities:
        row += 3 * data.image.size ** 2 * 4 + 1
    if "text" in data.modalities:
        row += 2 * data.text.max_length * 8 + 1
    if "audio" in data.modalities:
        row += data.audio.num_samples * 4 + 1
    return row


_SHARED: dict[str, "Preprocessor"] = {}  # Preprocessor.shared


class Preprocessor:
    """Decodes numpy batches of shard columns into model inputs (see the module docstring).

    Args:
        data: the job's ``data`` section.
        info: the dataset (its tokenizer, tasks and label ranges); None for raw inputs with a
            ``tokenizer`` given (the predictor).
        train: augment images (random shift, brightness) when ``data.image.augment`` is on.
        seed: seeds the augmentation.
        tokenizer: use this tokenizer instead of loading one from ``data.text`` / ``info``.

    Raises:
        UserError: a modality in ``data.modalities`` is not in the dataset, or the tokenizer cannot be loaded.
    """

    def __init__(
        self,
        data: DataConfig,
        info: DatasetInfo | None,
        *,
        train: bool,
        seed: int = 0,
        tokenizer: TextTokenizer | None = None,
    ):
        self.data, self.info, self.train = data, info, train
        if info is not None:
            absent = [m for m in data.modalities if m not in info.modalities]
            if absent:
                raise UserError(
                    f"data.modalities: {', '.join(absent)} not in dataset {info.path} "
                    f"(it has {', '.join(info.modalities)})"
                )
        self.tokenizer = None
        if "text" in data.modalities:
            self.tokenizer = tokenizer or TextTokenizer.load(data.text, info)
        self.augment = train and data.image.augment
        self._rng = np.random.default_rng(seed)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Decode one batch.

        Args:
            batch: column name -> array of B values: ``id`` (str), ``label``/``label_<task>`` (int),
                and the modality columns (bytes / str / None for a missing cell).

        Returns:
            The model batch (numpy arrays; see the module docstring).

        Raises:
            BadRecordError: a record fails to decode and ``data.on_bad_record`` is ``fail``.
        """
        return self.finish(self.decode(batch))

    def decode(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The first half of :meth:`__call__`: everything that is the same every epoch (what the decoded-input
        cache, :mod:`mmray.data.decoded`, stores). As the model batch, except ``image``: uint8 [B, S, S, 3] pixels,
        before augmentation and normalisation. Rows that failed to decode are zeros with ``valid`` False.

        Raises:
            BadRecordError: a record fails to decode and ``data.on_bad_record`` is ``fail``.
        """
        n = len(next(iter(batch.values())))
        ids = batch["id"] if "id" in batch else [f"row-{i}" for i in range(n)]
        valid = np.ones(n, dtype=bool)
        out: dict[str, np.ndarray] = {}
        for i, damage in enumerate(batch.get(DAMAGED, ())):
            if damage is not None:  # the reader already said so once for the whole row group
                if self.data.on_bad_record == "fail":
                    column, _, reason = str(damage).partition(": ")
                    raise BadRecordError(str(ids[i]), column, reason)
                valid[i] = False
        for key in sorted(k for k in batch if k == "label" or k.startswith("label_")):
            out[key] = self._labels(key, batch[key], ids, valid)
        for m in self.data.modalities:
            column = batch[m] if m in batch else [None] * n
            getattr(self, f"_{m}")(column, ids, valid, out)
        out["valid"] = valid
        if not valid.all():
            self._zero_invalid(out, valid)
        return out

    def finish(self, decoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The second half of :meth:`__call__`: a :meth:`decode` batch -> the model batch. Augments (seeded: the
        same draws as decoding and finishing each batch in turn) and normalises images; leaves ``decoded`` as is."""
        out = dict(decoded)
        if "image" in out:
            cfg, present = self.data.image, out["image_present"]
            x = self._augment(out["image"]) if self.augment else out["image"]
            x = _normalise(x, cfg)
            x[~present] = 0.0  # missing images and bad rows (decode cleared their present flag)
            out["image"] = x
        return out

    @classmethod
    def shared(cls, data: DataConfig, info: DatasetInfo, train: bool, seed: int) -> "Preprocessor":
        """This process's preprocessor for these settings, built once (and its tokenizer loaded once): Ray reuses
        worker processes across data tasks. Its augmentation draws go on from one task to the next."""
        key = json.dumps([data.model_dump(mode="json"), info.path, info.to_json(), train, seed], sort_keys=True)
        pre = _SHARED.get(key)
        if pre is None:
            if len(_SHARED) >= 8:  # bounded: a long-lived worker may serve many jobs
                _SHARED.clear()
            pre = _SHARED[key] = cls(data, info, train=train, seed=seed)
        return pre

    @classmethod
    def for_raw(cls, data: DataConfig, tokenizer: TextTokenizer | None) -> "Preprocessor":
        """A preprocessor with no dataset around (the predictor), using ``tokenizer`` for text."""
        return cls(data, None, train=False, tokenizer=tokenizer)

    def from_raw(
        self,
        images: Sequence[bytes | None] | None = None,
        texts: Sequence[str | None] | None = None,
        audios: Sequence[bytes | None] | None = None,
        ids: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Decode raw inputs: encoded image bytes, texts, encoded audio bytes (None = missing).

        A list left out means that modality is missing in every row. No label keys are returned.

        Raises:
            UserError: the given lists differ in length, or all are empty, or an input cannot be decoded
                (the message names its row, ``input-<i>`` or the given id, and the reason).
        """
        given = {m: v for m, v in (("image", images), ("text", texts), ("audio", audios)) if v is not None}
        lengths = {m: len(v) for m, v in given.items()}
        if not lengths or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise UserError(f"predict: give the same non-zero number of images, texts and audios; got {lengths}")
        n = next(iter(lengths.values()))
        batch: dict[str, Any] = {"id": list(ids) if ids is not None else [f"input-{i}" for i in range(n)]}
        for m in self.data.modalities:
            column = np.empty(n, dtype=object)  # filled item by item: numpy must not split bytes or strings
            column[:] = list(given.get(m, [None] * n))
            batch[m] = column
        try:
            return self(batch)
        except BadRecordError as e:  # a caller's own input, not a record of a run: bad input (exit 2)
            raise UserError(f"{e.record_id}: {e.column}: {e.reason}") from None

    # -------------------------------------------------------------- per column
    def _bad(self, record_id: Any, column: str, reason: str, valid: np.ndarray, i: int) -> None:
        if self.data.on_bad_record == "fail":
            raise BadRecordError(str(record_id), column, reason)
        if valid[i]:
            log.warning("skipping bad record %r: column %r: %s", str(record_id), column, reason)
        valid[i] = False

    def _labels(self, key: str, column: Any, ids: Sequence, valid: np.ndarray) -> np.ndarray:
        col = np.asarray(column)
        n_classes = self.info.num_classes(key) if self.info is not None and key in self.info.tasks else None
        if col.dtype.kind in "iu" and (n_classes is None or (col.size == 0 or (col.min() >= 0 and col.max() < n_classes))):
            return col.astype(np.int64)
        labels = np.zeros(len(col), dtype=np.int64)
        for i, v in enumerate(col):  # slow path: nulls (object/float columns) or out-of-range ids
            if v is None or (isinstance(v, float) and math.isnan(v)):
                self._bad(ids[i], key, "label is null", valid, i)
            elif n_classes is not None and not 0 <= int(v) < n_classes:
                self._bad(ids[i], key, f"label {int(v)} is outside 0..{n_classes - 1}", valid, i)
            else:
                labels[i] = int(v)
        return labels

    def _image(self, column: Any, ids: Sequence, valid: np.ndarray, out: dict) -> None:
        cfg = self.data.image
        pixels = np.zeros((len(column), cfg.size, cfg.size, 3), dtype=np.uint8)
        present = np.zeros(len(column), dtype=bool)
        for i, raw in enumerate(column):
            if raw is None:
                continue
            try:
                pixels[i] = image_pixels(raw, cfg.size)
                present[i] = True
            except Exception as e:  # any decoder error means "not a readable image"
                self._bad(ids[i], "image", f"cannot decode image: {e}", valid, i)
        out["image"], out["image_present"] = pixels, present  # uint8 pixels; finish() augments and normalises

    def _augment(self, pixels: np.ndarray) -> np.ndarray:
        """Random shift (reflect-padded crop) and brightness jitter; uint8 [B,S,S,3] -> float32 0..255."""
        b, s = pixels.shape[0], pixels.shape[1]
        pad = max(1, int(s * SHIFT_FRACTION))
        padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        dy, dx = self._rng.integers(0, 2 * pad + 1, (2, b))
        shifted = np.stack([padded[i, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(b)]).astype(np.float32)
        gain = self._rng.uniform(1 - BRIGHTNESS_JITTER, 1 + BRIGHTNESS_JITTER, (b, 1, 1, 1)).astype(np.float32)
        return np.clip(shifted * gain, 0.0, 255.0)

    def _text(self, column: Any, ids: Sequence, valid: np.ndarray, out: dict) -> None:
        texts = [None if t is None else str(t) for t in column]
        out["input_ids"], out["attention_mask"] = self.tokenizer.encode(texts, self.data.text.max_length)
        out["text_present"] = np.array([t is not None for t in texts], dtype=bool)

    def _audio(self, column: Any, ids: Sequence, valid: np.ndarray, out: dict) -> None:
        cfg = self.data.audio
        audio = np.zeros((len(column), cfg.num_samples), dtype=np.float32)
        present = np.zeros(len(column), dtype=bool)
        by_rate: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        for i, raw in enumerate(column):
            if raw is None:
                continue
            try:
                wave, rate = read_audio(raw, cfg.seconds)
            except Exception as e:  # any decoder error means "not readable audio"
                self._bad(ids[i], "audio", f"cannot decode audio: {e}", valid, i)
                continue
            rows, waves = by_rate.setdefault(rate, ([], []))
            rows.append(i)
            waves.append(wave)
        # One resample call per distinct source rate (usually one per batch).
        for rate, (rows, waves) in by_rate.items():
            audio[rows] = _resample_batch(waves, rate, cfg)
            present[rows] = True
        out["audio"], out["audio_present"] = audio, present

    def _zero_invalid(self, out: dict[str, np.ndarray], valid: np.ndarray) -> None:
        bad = ~valid
        for key in ("image", "audio", "attention_mask", "image_present", "audio_present", "text_present"):
            if key in out:
                out[key][bad] = 0
        if "input_ids" in out:
            out["input_ids"][bad] = self.tokenizer.pad_id

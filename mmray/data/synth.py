"""``mmray data synth``: a procedural image + text + audio dataset whose labels need all three modalities.

Six classes = shape {circle, square, triangle} x pitch {low, high}, named ``circle-low``,
``circle-high``, ``square-low``, ... (label id = 2 * shape + pitch).

Each row holds real encoded media:

- **image** -- a 64x64 RGB PNG: one filled shape (circle, square or triangle; random size 12-22 px
  radius, position, rotation and colour, far in colour from the background) on a noisy background of
  a random colour. It tells the **shape** and nothing about the pitch.
- **audio** -- a 1.0 s, 16 kHz, mono, 16-bit WAV: a tone whose fundamental is low (200-350 Hz) or
  high (900-1400 Hz), with 1-3 random harmonics, a random attack/decay envelope, onset, amplitude and
  background noise. It tells the **pitch** and nothing about the shape.
- **text** -- an English sentence from varied templates and filler clauses. With probability 0.5 it
  contains a synonym hint of the shape ("boxy", "three-cornered", ...) and, independently, with
  probability 0.3 a hint of the pitch ("shrill", "rumbling", ...); otherwise no hint.

Best possible accuracy from each modality alone (the ceilings a model should approach):

==================  ==========================================================  ==========
modalities          why                                                         ceiling
==================  ==========================================================  ==========
image               shape known, pitch a coin flip: 1 x 1/2                     50 %
audio               pitch known, shape 1 of 3: 1/3 x 1                          33 %
text                shape (0.5 + 0.5/3) x pitch (0.3 + 0.7/2) = 0.667 x 0.65   ~43 %
image + text        1 x 0.65                                                    65 %
audio + text        0.667 x 1                                                   67 %
image + audio       1 x 1                                                       100 %
all three           1 x 1, and text covers part of a missing image or audio     ~100 %
==================  ==========================================================  ==========

Each modality cell is null (a missing modality) independently with probability
``missing_fraction`` (default 3 %), which lowers the fused ceiling by about 1-2 points. A row never
loses all three (its text is kept).

Everything is deterministic from ``seed``: each row draws from its own generator seeded by
``(seed, row index)``, so the same seed gives byte-identical shards. The split of a row is decided by a
hash of its id (``val_fraction`` / ``test_fraction``). Rows are generated and written one row group
at a time, so memory stays flat for millions of rows. Finally a small WordPiece tokenizer (vocabulary
at most 1000, lowercase, ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``) is trained on the train texts and
saved to ``DIR/tokenizer/tokenizer.json``
(its vocabulary is built deterministically, see :func:`train_tokenizer`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
import os
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image, ImageDraw

from mmray.config.errors import UserError
from mmray.data.dataset_dir import (
    SPLITS,
    DatasetInfo,
    ShardWriter,
    created_record,
    shard_schema,
    write_dataset_info,
)

SHAPES = ("circle", "square", "triangle")
PITCHES = ("low", "high")
CLASS_NAMES = tuple(f"{s}-{p}" for s in SHAPES for p in PITCHES)
MODALITIES = ("audio", "image", "text")

IMAGE_SIZE = 64
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
FUNDAMENTAL_HZ = {"low": (200.0, 350.0), "high": (900.0, 1400.0)}
SHAPE_HINT_P = 0.5
PITCH_HINT_P = 0.3
TOKENIZER_VOCAB = 1000
TOKENIZER_MAX_TEXTS = 200_000  # enough for a template vocabulary; keeps tokenizer training short

# ------------------------------------------------------------------------------------ text
SHAPE_WORDS = {
    "circle": ("round", "circular", "ring-shaped", "disc-like", "curved all around", "moon-like"),
    "square": ("boxy", "four-sided", "square", "blocky", "right-angled", "tile-like"),
    "triangle": ("three-sided", "pointy", "triangular", "wedge-shaped", "three-cornered", "arrowhead-like"),
}
PITCH_WORDS = {
    "low": ("deep", "low-pitched", "rumbling", "booming", "bass-heavy", "growling"),
    "high": ("shrill", "high-pitched", "squeaky", "piercing", "whistling", "chirpy"),
}
SHAPE_CLAUSES = (
    "the picture shows something {w}",
    "a {w} thing sits in the frame",
    "i noticed a {w} object",
    "it looked {w} to me",
    "the drawing was clearly {w}",
    "there is a {w} blob on the canvas",
)
PITCH_CLAUSES = (
    "the sound was {w}",
    "it made a {w} noise",
    "a {w} tone played",
    "the recording is rather {w}",
    "you can hear something {w}",
    "the beep came out {w}",
)
FILLER_CLAUSES = (
    "recorded on a quiet afternoon",
    "the sample was captured yesterday",
    "nothing else happened",
    "the colours were vivid",
    "it was logged by the lab",
    "someone pressed the button",
    "the file came from an old archive",
    "we looked at it twice",
    "the weather was mild",
    "this one is from the second batch",
    "a technician checked it",
    "the label was written by hand",
    "it took a moment to load",
    "my colleague agreed",
    "the room was busy",
    "no one complained",
)
JOINERS = (", ", " and ", "; ", ". ")


def _text(rng: np.random.Generator, shape: str, pitch: str) -> str:
    clauses = [FILLER_CLAUSES[i] for i in rng.choice(len(FILLER_CLAUSES), size=rng.integers(1, 3), replace=False)]
    if rng.random() < SHAPE_HINT_P:
        clauses.append(SHAPE_CLAUSES[rng.integers(len(SHAPE_CLAUSES))].format(w=_pick(rng, SHAPE_WORDS[shape])))
    if rng.random() < PITCH_HINT_P:
        clauses.append(PITCH_CLAUSES[rng.integers(len(PITCH_CLAUSES))].format(w=_pick(rng, PITCH_WORDS[pitch])))
    order = rng.permutation(len(clauses))
    out = clauses[order[0]]
    for i in order[1:]:
        joiner = JOINERS[rng.integers(len(JOINERS))]
        clause = clauses[i]
        out += joiner + (clause[0].upper() + clause[1:] if joiner == ". " else clause)
    return out[0].upper() + out[1:] + "."


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


# ------------------------------------------------------------------------------------ image
def _image(rng: np.random.Generator, shape: str) -> bytes:
    s = IMAGE_SIZE
    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0.0, 16.0, (s, s, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8), "RGB")
    fg = rng.integers(0, 256, 3)
    for _ in range(20):  # a fill colour clearly distinct from the background
        if np.abs(fg - bg).sum() >= 200:
            break
        fg = rng.integers(0, 256, 3)
    else:
        fg = 255 - bg
    r = rng.uniform(12.0, 22.0)
    cx, cy = rng.uniform(r + 2, s - r - 2, 2)
    angle = rng.uniform(0, 2 * math.pi)
    colour = tuple(int(c) for c in fg)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        pts = [
            (cx + r * math.cos(angle + 2 * math.pi * k / corners), cy + r * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)
        ]
        draw.polygon(pts, fill=colour)
    buf = io.BytesIO()
    # Noise does not compress; level 1 is much faster and the bytes stay deterministic.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ audio
_T = np.arange(int(SAMPLE_RATE * AUDIO_SECONDS), dtype=np.float64) / SAMPLE_RATE


def _audio(rng: np.random.Generator, pitch: str) -> bytes:
    f0 = rng.uniform(*FUNDAMENTAL_HZ[pitch])
    wave = np.zeros_like(_T)
    for k in range(1, int(rng.integers(1, 4)) + 1):  # fundamental + 0-2 overtones, decaying
        amp = 1.0 if k == 1 else rng.uniform(0.1, 0.6) / k
        wave += amp * np.sin(2 * math.pi * k * f0 * _T + rng.uniform(0, 2 * math.pi))
    onset = rng.uniform(0.0, 0.2)
    attack = rng.uniform(0.005, 0.08)
    decay = rng.uniform(0.3, 2.0)
    t = _T - onset
    env = np.where(t < 0, 0.0, np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0) / decay))
    wave = wave / np.max(np.abs(wave)) * env * rng.uniform(0.2, 0.8)
    wave += rng.normal(0.0, rng.uniform(0.005, 0.05), wave.shape)
    pcm = np.clip(wave, -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ rows
def _row(seed: int, index: int, missing_fraction: float) -> dict:
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    shape, pitch = SHAPES[label // 2], PITCHES[label % 2]
    row = {
        "id": row_id(index),
        "label": label,
        "image": _image(rng, shape),
        "text": _text(rng, shape, pitch),
        "audio": _audio(rng, pitch),
    }
    missing = rng.random(3) < missing_fraction
    if missing.all():
        missing[MODALITIES.index("text")] = False  # never a row with no input at all
    for m, gone in zip(MODALITIES, missing):
        if gone:
            row[m] = None
    return row


def row_id(index: int) -> str:
    return f"synth-{index:08d}"


def split_of(row_id_: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the id: the same id always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(row_id_.encode(), digest_size=8).digest(), "big") / 2.0**64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


def synth(
    out: str,
    rows: int,
    shards: int,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    command: str | None = None,
    missing_fraction: float = 0.03,
) -> DatasetInfo:
    """Write the synthetic dataset to the dataset directory ``out`` and return its :class:`DatasetInfo`.

    Args:
        out: dataset directory (created; old shards in it are replaced).
        rows: total rows over all splits.
        shards: shards per split (a split with fewer rows gets one shard per row; a shard over
            256 MB is split further).
        seed: the same seed gives byte-identical shards.
        val_fraction, test_fraction: expected fractions of rows in val and test (by id hash).
        command: the command line recorded in ``dataset.json``.
        missing_fraction: probability that each modality cell of a row is null.

    Raises:
        UserError: a count or fraction is out of range.
    """
    _check(rows, shards, val_fraction, test_fraction, missing_fraction)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    _clean(out)
    # First pass (cheap, hashes only): rows per split, to size the shards evenly.
    counts = dict.fromkeys(SPLITS, 0)
    for i in range(rows):
        counts[split_of(row_id(i), val_fraction, test_fraction)] += 1
    schema = shard_schema(MODALITIES)
    writers = {
        s: ShardWriter(out, s, schema, rows_per_shard=max(1, math.ceil(n / shards)))
        for s, n in counts.items()
    }
    for i in range(rows):
        row = _row(seed, i, missing_fraction)
        writers[split_of(row["id"], val_fraction, test_fraction)].write(row)
    splits = {s: w.close() for s, w in writers.items()}
    train_files = [os.path.join(out, f) for f in splits["train"].files]
    tokenizer = "tokenizer/tokenizer.json"
    train_tokenizer(_texts(train_files, TOKENIZER_MAX_TEXTS), os.path.join(out, tokenizer))
    info = DatasetInfo(
        path=out,
        modalities=MODALITIES,
        class_names=CLASS_NAMES,
        tasks={"label": CLASS_NAMES},
        splits=splits,
        rejected={"rows": 0, "by_reason": {}},
        tokenizer=tokenizer,
        media={"image": {"format": "png"}, "audio": {"format": "wav", "sample_rate": SAMPLE_RATE}},
        created=created_record(command, "synth"),
    )
    write_dataset_info(info)
    return info


def _check(rows: int, shards: int, val_fraction: float, test_fraction: float, missing_fraction: float) -> None:
    if rows < 1:
        raise UserError(f"--rows: must be at least 1, got {rows}")
    if shards < 1:
        raise UserError(f"--shards: must be at least 1, got {shards}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1"
        )
    if not 0 <= missing_fraction < 1:
        raise UserError(f"missing_fraction: must be in [0, 1), got {missing_fraction}")


def _clean(out: str) -> None:
    """Remove shards of an earlier dataset in ``out`` so no stale file is mistaken for data."""
    for split in SPLITS:
        for f in glob.glob(os.path.join(out, split, "part-*.parquet")):
            os.remove(f)


def _texts(files: list[str], limit: int) -> Iterator[str]:
    seen = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["text"], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if t is None:
                    continue
                yield t
                seen += 1
                if seen >= limit:
                    return


def train_tokenizer(texts: Iterator[str], path: str, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """Build a lowercase WordPiece tokenizer from ``texts`` and save it to ``path``.

    Vocabulary: ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, every character seen (alone and as a
    ``##`` continuation, so no word is ever unknown), then the most frequent whole words up to
    ``vocab_size`` (ties broken alphabetically). Counting words ourselves, rather than running the
    ``tokenizers`` WordPiece trainer, keeps the ids identical run after run: the trainer breaks
    frequency ties in hash order. Encoding a text gives ``[CLS] tokens... [SEP]``.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    pieces = specials + chars + ["##" + c for c in chars]
    taken = set(pieces)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in taken]
    vocab = {t: i for i, t in enumerate(pieces + words[: max(0, vocab_size - len(pieces))])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)  # already in the vocabulary: keeps ids, marks them special for decode
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)

"""``mmray data synth``: a procedural image + text + audio dataset whose labels need all three modalities.

Six classes = shape {circle, square, triangle} x pitch {low, high}, named ``circle-low``,
``circle-high``, ``square-low``, ... (label id = 2 * shape + pitch).

Each row holds real encoded media (sizes by default; see :class:`Media` for other sizes and formats):

- **image** -- a 64x64 RGB PNG (``image_size``, ``image_format`` png/jpeg/webp): one filled shape
  (circle, square or triangle; random radius 12-22 px at 64 px, scaled with the side, position,
  rotation and colour, far in colour from the background) on a noisy background of a random colour.
  It tells the **shape** and nothing about the pitch.
- **audio** -- a 1.0 s, 16 kHz, mono, 16-bit WAV (``audio_seconds``, ``sample_rate``): a tone whose
  fundamental is low (200-350 Hz) or high (900-1400 Hz), with 1-3 random harmonics (those above the
  Nyquist frequency are left out), a random attack/decay envelope (onset and decay scale with the
  length), amplitude and background noise. It tells the **pitch** and nothing about the shape.
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
``(seed, row index)``, so the same seed gives byte-identical shards, however many processes wrote them.
The split of a row is decided by a hash of its id (``val_fraction`` / ``test_fraction``); shard ``k`` of a
split holds that split's rows ``k * R .. (k + 1) * R - 1`` in index order (``R`` = the split's rows / ``shards``),
so each shard is one independent unit of work: written by a process of a local pool (``workers``) or by a
Ray task (``ray``), straight to the output folder or object-store URI, one row group at a time, so memory
stays flat for millions of rows. A shard over 256 MB continues in ``part-NNNNN-001.parquet``, ... Finally a small WordPiece tokenizer (vocabulary
at most 1000, lowercase, ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``) is trained on the train texts and
saved to ``DIR/tokenizer/tokenizer.json``
(its vocabulary is built deterministically, see :func:`train_tokenizer`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import multiprocessing
import os
import queue as queue_module
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image, ImageDraw

from mmray import storage
from mmray.config.errors import UserError
from mmray.data.dataset_dir import (
    SPLITS,
    DatasetInfo,
    ShardWriter,
    SplitInfo,
    created_record,
    shard_schema,
    write_dataset_info,
)
from mmray.data.progress import BuildProgress

SHAPES = ("circle", "square", "triangle")
PITCHES = ("low", "high")
CLASS_NAMES = tuple(f"{s}-{p}" for s in SHAPES for p in PITCHES)
MODALITIES = ("audio", "image", "text")

IMAGE_SIZE = 64
IMAGE_FORMAT = "png"
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
IMAGE_FORMATS = ("jpeg", "png", "webp")
IMAGE_SIZES = (16, 2048)  # the shape (radius 12-22 px at 64 px, 2 px margin) needs 16 px
SAMPLE_RATES = (8000, 48000)
AUDIO_LENGTHS = (0.1, 60.0)
LOSSY_QUALITY = 90  # JPEG and WebP
FUNDAMENTAL_HZ = {"low": (200.0, 350.0), "high": (900.0, 1400.0)}
SHAPE_HINT_P = 0.5
PITCH_HINT_P = 0.3
TOKENIZER_VOCAB = 1000
TOKENIZER_MAX_TEXTS = 200_000  # enough for a template vocabulary; keeps tokenizer training short
AUTO_PARALLEL_ROWS = 1000  # below this a process pool's start-up is not worth it

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
def _image(rng: np.random.Generator, shape: str, size: int = IMAGE_SIZE, fmt: str = IMAGE_FORMAT) -> bytes:
    s, scale = size, size / IMAGE_SIZE  # 64 px: scale 1.0, the draws of every earlier version
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
    r = rng.uniform(12.0 * scale, 22.0 * scale)
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
    if fmt == "png":  # noise does not compress; level 1 is much faster and the bytes stay deterministic
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=LOSSY_QUALITY)
    else:
        img.save(buf, format="WEBP", quality=LOSSY_QUALITY)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ audio
@functools.lru_cache(maxsize=4)
def _timeline(seconds: float, rate: int) -> np.ndarray:
    """Sample times in seconds (read-only: shared by every row of a process)."""
    t = np.arange(int(round(rate * seconds)), dtype=np.float64) / rate
    t.flags.writeable = False
    return t


def _audio(rng: np.random.Generator, pitch: str, seconds: float = AUDIO_SECONDS, rate: int = SAMPLE_RATE) -> bytes:
    times = _timeline(seconds, rate)
    f0 = rng.uniform(*FUNDAMENTAL_HZ[pitch])
    wave = np.zeros_like(times)
    for k in range(1, int(rng.integers(1, 4)) + 1):  # fundamental + 0-2 overtones, decaying
        amp = 1.0 if k == 1 else rng.uniform(0.1, 0.6) / k
        phase = rng.uniform(0, 2 * math.pi)
        if k * f0 < rate / 2:  # an overtone above Nyquist would fold back as a false pitch (its draws stay)
            wave += amp * np.sin(2 * math.pi * k * f0 * times + phase)
    onset = rng.uniform(0.0, 0.2 * seconds)  # 1 s: the draws of every earlier version
    attack = rng.uniform(0.005, 0.08)
    decay = rng.uniform(0.3, 2.0) * seconds
    t = times - onset
    env = np.where(t < 0, 0.0, np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0) / decay))
    wave = wave / np.max(np.abs(wave)) * env * rng.uniform(0.2, 0.8)
    wave += rng.normal(0.0, rng.uniform(0.005, 0.05), wave.shape)
    pcm = np.clip(wave, -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Media:
    """How each row's media are made: the image's side and format, the recording's length and rate."""

    image_size: int = IMAGE_SIZE
    image_format: str = IMAGE_FORMAT
    audio_seconds: float = AUDIO_SECONDS
    sample_rate: int = SAMPLE_RATE

    def describe(self) -> dict[str, Any]:
        """The ``media`` section of ``dataset.json``."""
        return {"image": {"format": self.image_format, "size": self.image_size},
                "audio": {"format": "wav", "sample_rate": self.sample_rate, "seconds": self.audio_seconds}}


def _row(seed: int, index: int, missing_fraction: float, media: Media = Media()) -> dict:
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    shape, pitch = SHAPES[label // 2], PITCHES[label % 2]
    row = {
        "id": row_id(index),
        "label": label,
        "image": _image(rng, shape, media.image_size, media.image_format),
        "text": _text(rng, shape, pitch),
        "audio": _audio(rng, pitch, media.audio_seconds, media.sample_rate),
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


# ------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class _Shard:
    """One unit of work: shard ``number`` of ``split``, the rows ``indices`` (ascending)."""

    split: str
    number: int
    indices: np.ndarray


def _shards(rows: int, shards: int, val_fraction: float, test_fraction: float) -> list[_Shard]:
    """Every split's rows in index order, cut into ``shards`` shards of equal row counts (the last one shorter)."""
    code = {s: i for i, s in enumerate(SPLITS)}
    of = np.fromiter((code[split_of(row_id(i), val_fraction, test_fraction)] for i in range(rows)),
                     dtype=np.uint8, count=rows)
    units = []
    for s, c in code.items():
        idx = np.flatnonzero(of == c).astype(np.int64)
        per = max(1, math.ceil(len(idx) / shards))
        units += [_Shard(s, k, idx[start:start + per]) for k, start in enumerate(range(0, len(idx), per))]
    # Largest first: a pool finishes soonest when the long shards start early.
    return sorted(units, key=lambda u: -len(u.indices))


def _write_shard(out: str, shard: _Shard, seed: int, missing_fraction: float, media: Media,
                 report: Callable[[int], object]) -> SplitInfo:
    """Generate and write one shard (in whichever process runs it); ``report(rows)`` after each row group."""
    writer = ShardWriter(out, shard.split, shard_schema(MODALITIES), rows_per_shard=len(shard.indices),
                         stem=f"part-{shard.number:05d}")
    step = writer.row_group_rows
    for start in range(0, len(shard.indices), step):
        for i in shard.indices[start:start + step]:
            writer.write(_row(seed, int(i), missing_fraction, media))
        report(min(step, len(shard.indices) - start))
    return writer.close()


_QUEUE = None  # the progress queue of a pool worker (inherited through the pool's initializer)


def _pool_init(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _pool_shard(out: str, shard: _Shard, seed: int, missing_fraction: float, media: Media) -> SplitInfo:
    return _write_shard(out, shard, seed, missing_fraction, media, _QUEUE.put)


def _run_pool(units: list[_Shard], workers: int, progress: BuildProgress, *args) -> list[SplitInfo]:
    # fork where there is one, as `data prepare` does: workers start in milliseconds and never re-run the
    # caller's __main__. Each worker writes its own shards, so only row counts travel back.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init, initargs=(queue,)) as pool:
        futures = {pool.submit(_pool_shard, *args[:1], u, *args[1:]): i for i, u in enumerate(units)}
        results: list[SplitInfo | None] = [None] * len(units)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                _drain(queue, progress)
                for f in done:
                    results[futures[f]] = f.result()
        finally:
            for f in pending:
                f.cancel()
    _drain(queue, progress)
    return results  # type: ignore[return-value]


def _drain(queue, progress: BuildProgress) -> None:
    while True:
        try:
            progress.add(queue.get_nowait())
        except queue_module.Empty:
            return


def _run_ray(units: list[_Shard], address: str | None, progress: BuildProgress, *args) -> list[SplitInfo]:
    from mmray.runtime import ensure_ray  # starts or joins Ray: only for --ray

    ray = ensure_ray(address)
    from ray.util.queue import Queue  # an actor: needs the Ray started above

    queue = Queue()
    task = ray.remote(num_cpus=1, max_retries=2)(_ray_shard)
    refs = [task.remote(args[0], u, *args[1:], queue) for u in units]
    index = {r: i for i, r in enumerate(refs)}
    results: list[SplitInfo | None] = [None] * len(units)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for n in queue.get_nowait_batch(queue.qsize()):
                progress.add(n)
            for r in done:
                results[index[r]] = ray.get(r)
    finally:
        for r in pending:
            ray.cancel(r)
    for n in queue.get_nowait_batch(queue.qsize()):
        progress.add(n)
    queue.shutdown()
    return results  # type: ignore[return-value]


def _ray_shard(out: str, shard: _Shard, seed: int, missing_fraction: float, media: Media, queue) -> SplitInfo:
    return _write_shard(out, shard, seed, missing_fraction, media, queue.put)


# ------------------------------------------------------------------------------------ the dataset
def synth(
    out: str,
    rows: int,
    shards: int,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    command: str | None = None,
    missing_fraction: float = 0.03,
    media: Media = Media(),
    workers: int = 0,
    ray: bool = False,
    address: str | None = None,
    progress: BuildProgress | None = None,
) -> DatasetInfo:
    """Write the synthetic dataset to the dataset directory ``out`` and return its :class:`DatasetInfo`.

    Args:
        out: dataset directory, a local path or an object-store URI (created; old shards in it are replaced).
        rows: total rows over all splits.
        shards: shards per split (a split with fewer rows gets one shard per row; a shard over
            256 MB continues in further files). Each shard is one unit of parallel work.
        seed: the same seed gives byte-identical shards, however many workers wrote them.
        val_fraction, test_fraction: expected fractions of rows in val and test (by id hash).
        command: the command line recorded in ``dataset.json``.
        missing_fraction: probability that each modality cell of a row is null.
        media: image side and format, audio length and sample rate.
        workers: processes writing shards; 0 = automatic (one per CPU for 1,000+ rows, at most one per
            shard), 1 = all in this process. Ignored with ``ray``.
        ray: write the shards as Ray tasks, on the cluster at ``address`` (or ``RAY_ADDRESS``), else on a
            local Ray started for it. On a multi-node cluster ``out`` must be an object-store URI or a
            folder every node sees.
        address: a Ray cluster address; implies ``ray``.
        progress: receives the rows written (default: a line every 10 s on stdout).

    Raises:
        UserError: a count, fraction or media setting is out of range.
    """
    _check(rows, shards, val_fraction, test_fraction, missing_fraction, media, workers)
    out = storage.normalize(out)
    _clean(out)
    for split in SPLITS:  # every split has its folder, even an empty one
        storage.makedirs(storage.join(out, split))
    units = _shards(rows, shards, val_fraction, test_fraction)
    progress = progress or BuildProgress(rows, MODALITIES, what="data synth", verb="written")
    args = (out, seed, missing_fraction, media)
    n_workers = min(len(units), workers or _auto_workers(rows))
    if ray or address:
        results = _run_ray(units, address, progress, *args)
    elif n_workers > 1:
        results = _run_pool(units, n_workers, progress, *args)
    else:
        results = [_write_shard(out, u, seed, missing_fraction, media, progress.add) for u in units]
    splits = {s: _merge([(u, r) for u, r in zip(units, results) if u.split == s]) for s in SPLITS}
    train_files = [storage.join(out, f) for f in splits["train"].files]
    tokenizer = "tokenizer/tokenizer.json"
    with storage.local_output(storage.join(out, tokenizer)) as local:
        train_tokenizer(_texts(train_files, TOKENIZER_MAX_TEXTS), local)
    info = DatasetInfo(
        path=out,
        modalities=MODALITIES,
        class_names=CLASS_NAMES,
        tasks={"label": CLASS_NAMES},
        splits=splits,
        rejected={"rows": 0, "by_reason": {}},
        tokenizer=tokenizer,
        media=media.describe(),
        created=created_record(command, "synth"),
    )
    write_dataset_info(info)
    return info


def _auto_workers(rows: int) -> int:
    return 1 if rows < AUTO_PARALLEL_ROWS else (os.cpu_count() or 1)


def _merge(done: list[tuple[_Shard, SplitInfo]]) -> SplitInfo:
    """The split's :class:`SplitInfo` from its shards' (in shard order)."""
    done = sorted(done, key=lambda d: d[0].number)
    present = {m: sum(r.present[m] for _, r in done) for m in MODALITIES}
    return SplitInfo(rows=sum(r.rows for _, r in done), files=tuple(f for _, r in done for f in r.files),
                     present=present)


def _check(rows: int, shards: int, val_fraction: float, test_fraction: float, missing_fraction: float,
           media: Media, workers: int) -> None:
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
    if media.image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format: {media.image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    for flag, value, (low, high) in (("--image-size", media.image_size, IMAGE_SIZES),
                                     ("--audio-seconds", media.audio_seconds, AUDIO_LENGTHS),
                                     ("--sample-rate", media.sample_rate, SAMPLE_RATES)):
        if not low <= value <= high:
            raise UserError(f"{flag}: {value:g}; must be from {low:g} to {high:g}")
    if workers < 0:
        raise UserError(f"--workers: {workers}; must be 0 (automatic) or more")


def _clean(out: str) -> None:
    """Remove an earlier dataset in ``out`` (its dataset.json first, then its shards), so no stale file is
    mistaken for data and a run stopped half-way leaves no dataset.json naming shards it did not write."""
    storage.remove(storage.join(out, "dataset.json"))
    for split in SPLITS:
        folder = storage.join(out, split)
        for name in storage.listdir(folder):
            if name.startswith("part-") and name.endswith(".parquet"):
                storage.remove(storage.join(folder, name))


def _texts(files: list[str], limit: int) -> Iterator[str]:
    seen = 0
    for f in files:
        fs, inner = storage.resolve(f)
        with fs.open_input_file(inner) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["text"], batch_size=1024):
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)

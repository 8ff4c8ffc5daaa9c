"""``mmray data prepare MANIFEST --out DIR``: a user's own files -> a dataset directory, no row lost silently.

For each manifest row, in order:

1. **Row checks** (in this process): the id (empty, duplicate), every label column (empty, not an
   integer in an integer column, negative) and the split cell (not train/val/test). A failure rejects
   the row; its media are not read.
2. **Media checks** (in worker processes for large manifests): each image and audio file is read and
   **decoded** with the decoders training uses (:func:`mmray.data.decode.image_pixels`,
   :func:`mmray.data.decode.read_audio`). A missing, empty, unreadable or undecodable file, or audio
   with no samples, makes that modality missing; so does an empty caption. PNG/JPEG/WebP and WAV/FLAC
   are stored as the file's own bytes; other formats the decoders read (BMP, GIF, TIFF; OGG, AIFF...)
   are re-encoded to PNG / FLAC.
3. A row with no usable modality left is rejected; a row with some is kept and the others are null.

Every decision is one line of ``DIR/rejected.jsonl``: ``row`` (1-based data row of the manifest), ``id``,
``column`` (the manifest column), ``reason``, ``detail`` and ``outcome`` (``rejected``: the row was
dropped; ``missing``: the row was kept without that modality). ``dataset.json`` holds the counts
(``rejected``: rows in, kept, rejected and partly missing, per reason). Output is built in a staging
folder next to ``DIR`` and moved into place at the end, so a failed or ``strict`` run leaves nothing.

**On Ray** (``ray="on"``, or ``"auto"`` for a large manifest when a cluster is given): this process still
reads the manifest and makes the row checks (they need every id seen so far); each chunk of
:data:`RAY_CHUNK_ROWS` rows that passed them goes to a Ray task that reads, decodes and writes its own
shards (``<split>/part-<chunk>-NNNNN.parquet``) straight into the output's staging folder, and returns only
its decisions and counts. They are merged in manifest order, so the kept rows (in order, byte for byte),
``rejected.jsonl`` and the counts are those of the serial path; only the shard boundaries differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

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
from mmray.data.decode import image_pixels, read_audio
from mmray.data.manifest import (
    ColumnMap,
    LabelMap,
    Manifest,
    ResolvedColumns,
    is_empty,
    load_manifest,
    resolve_columns,
)
from mmray.data.synth import TOKENIZER_MAX_TEXTS, _texts, split_of, train_tokenizer

KEPT_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
KEPT_AUDIO_FORMATS = {"WAV": "wav", "FLAC": "flac"}
IMAGE_CHECK_SIZE = 32  # decoding at a small size still reads every byte of the file
AUDIO_CHECK_SECONDS = 3600.0  # read the whole recording (up to an hour), as a long crop would
CHUNK_ROWS = 64  # rows per worker task
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# The pool costs ~1.5x the CPU per row of the serial path (file bytes travel back to this process), so it
# pays only with spare cores and enough rows (benchmarks/RESULTS.md, "data prepare").
AUTO_PARALLEL_ROWS = 2000
AUTO_PARALLEL_MIN_CPUS = 4
AUTO_MAX_WORKERS = 8
# On Ray each task writes its own shards, so no file bytes travel back: the driver keeps only the row checks
# and the merge. Tasks stream their rows in CHUNK_ROWS steps, so a task's memory does not grow with its size;
# RAY_CHUNK_ROWS sets how many shards a run makes (one per split per task, more past --shard-mb).
RAY_CHUNK_ROWS = 4096
RAY_MODES = ("auto", "on", "off")
# "auto" runs on Ray only when a cluster is given (RAY_ADDRESS, as on a cluster node or in a Ray job, or a Ray
# already started in this process) and the manifest fills several tasks; it never starts a local Ray just to
# prepare (~10 s to start; benchmarks/RESULTS.md, "Data prepare on Ray", for what a small machine gains).
AUTO_RAY_ROWS = 20_000
STRICT_SHOWN = 10


@dataclass(frozen=True)
class Problem:
    """One decision about one row: a rejected row or a missing modality."""

    row: int
    id: str | None
    column: str | None  # the manifest's column name (None: the row as a whole)
    field: str  # what it is to us: id, label, label_<task>, split, image, text, audio, row
    reason: str
    detail: str
    outcome: str  # "rejected" | "missing"

    @property
    def key(self) -> str:
        return f"{self.field}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "id": self.id, "column": self.column, "reason": self.key,
                "detail": self.detail, "outcome": self.outcome}

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"row {self.row} id {self.id!r} column {self.column!r}: {self.reason}{detail}"


@dataclass
class PrepareReport:
    """What ``prepare`` did: the counts the summary prints and ``dataset.json`` records."""

    info: DatasetInfo
    rows_in: int
    kept: int
    rejected: int
    partly_missing: int
    rejected_by_reason: dict[str, int]
    missing_by_reason: dict[str, int]
    seconds: float
    workers: int
    replaced: bool = False
    split_source: str = ""
    ray_tasks: int = 0  # > 0: the media were checked and written by this many Ray tasks

    def _how(self) -> str:
        if self.ray_tasks:
            return f"on Ray: {self.ray_tasks} task{'s' if self.ray_tasks != 1 else ''}"
        return f"{self.workers} worker process{'es' if self.workers != 1 else ''}"

    def summary(self) -> str:
        """The end-of-run summary a person reads."""
        splits = ", ".join(f"{s} {self.info.splits[s].rows}" for s in self.info.splits)
        lines = [
            f"prepared {self.info.path} in {self.seconds:.1f} s ({self._how()}"
            f"{', replaced the old dataset' if self.replaced else ''})",
            f"  rows in          {self.rows_in:>9,}",
            f"  kept             {self.kept:>9,}   ({splits}; split {self.split_source})",
            f"    complete       {self.kept - self.partly_missing:>9,}",
            f"    partly missing {self.partly_missing:>9,}",
            f"  rejected         {self.rejected:>9,}",
        ]
        if self.rejected_by_reason:
            lines.append("rejected rows by reason:")
            lines += [f"  {n:>9,}  {r}" for r, n in _by_count(self.rejected_by_reason)]
        if self.missing_by_reason:
            lines.append("missing modalities in kept rows by reason:")
            lines += [f"  {n:>9,}  {r}" for r, n in _by_count(self.missing_by_reason)]
        lines.append(f"classes ({len(self.info.class_names)}): {_preview(self.info.class_names)}")
        if self.rejected or self.partly_missing:
            lines.append(f"every decision, row by row: {os.path.join(self.info.path, 'rejected.jsonl')}")
        empty = [s for s in SPLITS if self.info.splits[s].rows == 0]
        if empty:
            lines.append(f"warning: no rows in split {', '.join(empty)}")
        return "\n".join(lines)


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _preview(names: Sequence[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------ media checks (worker side)
def check_media(folder: str, cells: list[dict[str, Any]]) -> list[dict[str, tuple]]:
    """Read and decode the image/audio files of a chunk of rows (runs in a worker process; no shared state).

    Args:
        folder: relative paths are relative to this folder.
        cells: per row, modality -> the manifest cell (a path) for image and audio.

    Returns:
        Per row, modality -> ``(encoded bytes, format, None, "")`` or ``(None, None, reason, detail)``.
    """
    out = []
    for row in cells:
        done = {}
        for modality, cell in row.items():
            data, reason, detail = _read_file(folder, cell)
            if data is not None:
                check = _check_image if modality == "image" else _check_audio
                value, fmt, reason, why = check(data)
                done[modality] = (value, fmt, reason, f"{detail}: {why}" if why else detail if reason else "")
            else:
                done[modality] = (None, None, reason, detail)
        out.append(done)
    return out


def _read_file(folder: str, cell: Any) -> tuple[bytes | None, str, str]:
    if is_empty(cell):
        return None, "no file given", ""
    path = os.path.join(folder, str(cell).strip())  # an absolute cell stays absolute
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing file", path
    except IsADirectoryError:
        return None, "not a file", path
    except OSError as e:
        return None, "cannot read file", f"{path}: {e.strerror or e}"
    if not data:
        return None, "empty file", path
    return data, "", path


def _error(e: Exception) -> str:
    """A decoder's error for a person: no object addresses (PIL names the BytesIO it was given)."""
    return f"{type(e).__name__}: " + re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))


def _check_image(data: bytes) -> tuple:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
        image_pixels(data, IMAGE_CHECK_SIZE)  # the training decoder: forces a full decode
    except Exception as e:  # any decoder error means "not a readable image"
        return None, None, "cannot decode image", _error(e)
    if fmt in KEPT_IMAGE_FORMATS:
        return data, KEPT_IMAGE_FORMATS[fmt], None, ""
    with Image.open(io.BytesIO(data)) as img:  # a format the contract does not store: re-encode losslessly
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return buf.getvalue(), f"png (from {fmt.lower()})", None, ""


def _check_audio(data: bytes) -> tuple:
    import soundfile as sf

    try:
        fmt = sf.info(io.BytesIO(data)).format
        read_audio(data, AUDIO_CHECK_SECONDS)  # the training decoder
    except ValueError as e:
        if "no samples" in str(e):
            return None, None, "audio has no samples", ""
        return None, None, "cannot decode audio", _error(e)
    except Exception as e:  # any decoder error means "not readable audio"
        return None, None, "cannot decode audio", _error(e)
    if fmt in KEPT_AUDIO_FORMATS:
        return data, KEPT_AUDIO_FORMATS[fmt], None, ""
    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), f"flac (from {fmt.lower()})", None, ""


# ------------------------------------------------------------------------------ the run
@dataclass
class _Tally:
    rows_in: int = 0
    kept: int = 0
    rejected: int = 0
    partly_missing: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    missing_by_reason: Counter = field(default_factory=Counter)
    formats: dict[str, Counter] = field(default_factory=dict)
    first_problems: list[Problem] = field(default_factory=list)
    tasks: int = 0  # Ray tasks run

    def add(self, other: "_Tally") -> None:
        """Add the counts of a chunk's tally (a Ray task's); rows_in and problems are counted by the merge."""
        self.kept += other.kept
        self.rejected += other.rejected
        self.partly_missing += other.partly_missing
        self.rejected_by_reason.update(other.rejected_by_reason)
        self.missing_by_reason.update(other.missing_by_reason)
        for m, c in other.formats.items():
            self.formats.setdefault(m, Counter()).update(c)


def prepare(
    manifest_path: str,
    out: str,
    *,
    columns: ColumnMap = ColumnMap(),
    label_type: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strict: bool = False,
    workers: int = 0,
    shard_mb: int = 256,
    ray: str = "auto",
    command: str | None = None,
    progress: Callable[[int, int, int, int], None] | None = None,
    chunk_rows: int = RAY_CHUNK_ROWS,
    run_chunks: Callable | None = None,
) -> PrepareReport:
    """Turn a manifest and its media files into a dataset directory at ``out``.

    Args:
        manifest_path: a ``.csv``, ``.jsonl`` or ``.parquet`` manifest.
        out: the dataset directory (local). An existing dataset there is replaced; any other
            non-empty folder is refused.
        columns: the column mapping (defaults: ``id``, ``label``, ``split``, ``image``, ``text``, ``audio``).
        label_type: ``auto`` | ``int`` | ``str`` for every label column (see :class:`LabelMap`).
        val_fraction, test_fraction: the hash split's fractions (ignored with a split column).
        strict: any problem at all raises :class:`UserError` naming the first rows; nothing is written.
        workers: worker processes for the media checks; 0 = automatic (one per CPU, at most 8,
            for 2,000+ rows on 4+ CPUs; otherwise none), 1 = all in this process. On Ray: the most tasks
            running at once (0 = one per CPU of the cluster).
        shard_mb: start a new shard after this many MB of row data.
        ray: ``on``: Ray tasks check, decode and write the media (joining ``RAY_ADDRESS``, or a local Ray);
            ``off``: this machine only; ``auto``: on Ray for :data:`AUTO_RAY_ROWS`+ rows when a cluster is
            given (``RAY_ADDRESS`` set, or Ray already started in this process), else off.
        command: the command line recorded in ``dataset.json``.
        progress: called as ``progress(rows_done, rows_total, kept, rejected)`` while it works.
        chunk_rows: rows per Ray task.
        run_chunks: runs the chunked (Ray) path's tasks instead of Ray, as ``run_chunks(fn, jobs, workers)``
            yielding each job's result in order (tests: the same merge, no cluster).

    Raises:
        UserError: bad flags or manifest (before any file is read), or ``strict`` and a problem row.
    """
    started = time.perf_counter()
    _check_options(out, label_type, val_fraction, test_fraction, workers, shard_mb, ray, chunk_rows)
    manifest = load_manifest(manifest_path)
    cols = resolve_columns(manifest, columns)
    labels = {"label": LabelMap.fit(cols.label, manifest.columns[cols.label], label_type)}
    for task, col in cols.tasks.items():
        labels[task] = LabelMap.fit(col, manifest.columns[col], label_type)
    out = os.path.abspath(out)
    replaced = _check_out(out)
    on_ray = run_chunks is not None or _use_ray(ray, manifest.num_rows)
    n_workers = workers if on_ray else workers or _auto_workers(manifest.num_rows)

    staging = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        if on_ray:
            tally, splits = _run_chunked(manifest, cols, labels, staging, val_fraction, test_fraction, strict,
                                         n_workers, shard_mb, progress, chunk_rows, run_chunks or _ray_chunks)
        else:
            tally, splits = _run(manifest, cols, labels, staging, val_fraction, test_fraction, strict,
                                 n_workers, shard_mb, progress)
        if strict and tally.first_problems:
            shown = "\n".join(f"  {p}" for p in tally.first_problems[:STRICT_SHOWN])
            raise UserError(f"--strict: {manifest_path} has problem rows (nothing was written); the first:\n{shown}")
        info = _finish(staging, out, manifest, cols, labels, splits, tally, command)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replaced:
        shutil.rmtree(out)
    elif os.path.isdir(out):
        os.rmdir(out)  # empty
    os.replace(staging, out)
    info = dataclasses.replace(info, path=out)
    return PrepareReport(
        info=info, rows_in=tally.rows_in, kept=tally.kept, rejected=tally.rejected,
        partly_missing=tally.partly_missing, rejected_by_reason=dict(tally.rejected_by_reason),
        missing_by_reason=dict(tally.missing_by_reason), seconds=time.perf_counter() - started,
        workers=n_workers, replaced=replaced, ray_tasks=tally.tasks,
        split_source=f"from column {cols.split!r}" if cols.split else
        f"by id hash, val {val_fraction:g} / test {test_fraction:g}",
    )


def _auto_workers(rows: int) -> int:
    cpus = os.cpu_count() or 1
    if rows < AUTO_PARALLEL_ROWS or cpus < AUTO_PARALLEL_MIN_CPUS:
        return 1
    return min(cpus, AUTO_MAX_WORKERS)


def _use_ray(mode: str, rows: int) -> bool:
    if mode != "auto":
        return mode == "on"
    if rows < AUTO_RAY_ROWS:
        return False
    ray = sys.modules.get("ray")  # never imported just to ask
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def _check_options(out: str, label_type: str, val_fraction: float, test_fraction: float,
                   workers: int, shard_mb: int, ray: str = "auto", chunk_rows: int = RAY_CHUNK_ROWS) -> None:
    problems = []
    if "://" in out:
        problems.append(f"--out: {out!r}: prepare writes to a local folder; copy it to remote storage afterwards")
    if label_type not in ("auto", "int", "str"):
        problems.append(f"--label-type: {label_type!r}; choose one of auto, int, str")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        problems.append(f"--split-fractions: val {val_fraction:g} and test {test_fraction:g} must be in [0, 1) "
                        "and leave room for train")
    if workers < 0:
        problems.append(f"--workers: {workers}; must be 0 (automatic) or more")
    if shard_mb < 1:
        problems.append(f"--shard-mb: {shard_mb}; must be at least 1")
    if ray not in RAY_MODES:
        problems.append(f"--ray: {ray!r}; choose one of {', '.join(RAY_MODES)}")
    if chunk_rows < 1:
        problems.append(f"chunk_rows: {chunk_rows}; must be at least 1")
    if problems:
        raise UserError("\n".join(problems))


def _check_out(out: str) -> bool:
    """True when ``out`` holds an earlier dataset (replaced at the end); refuses other non-empty folders."""
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise UserError(f"--out: {out} exists and is not a folder")
    if not os.listdir(out):
        return False
    if os.path.isfile(os.path.join(out, "dataset.json")):
        return True
    raise UserError(f"--out: {out} is a non-empty folder that is not a dataset directory; "
                    "choose a new folder (prepare replaces only an earlier dataset)")


def _checked_chunks(manifest: Manifest, cols: ResolvedColumns, labels: dict[str, LabelMap], val_fraction: float,
                    test_fraction: float, size: int) -> Iterator[list[tuple[int, dict | list[Problem]]]]:
    """Chunks of ``size`` ``(row number, row or the problems that reject it)``, in manifest order (row checks)."""
    seen_ids: dict[str, int] = {}
    chunk: list[tuple[int, dict | list[Problem]]] = []
    for i in range(manifest.num_rows):
        chunk.append((i + 1, _row_checks(manifest, cols, labels, i, i + 1, seen_ids, val_fraction,
                                         test_fraction, split_of)))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Record:
    """``DIR/rejected.jsonl``, written in manifest order; keeps the first problems for ``--strict``."""

    def __init__(self, staging: str, tally: _Tally):
        self.file, self.tally = open(os.path.join(staging, "rejected.jsonl"), "w"), tally

    def __call__(self, problems: list[Problem]) -> None:
        for p in problems:
            self.file.write(json.dumps(p.to_json()) + "\n")
        shown = self.tally.first_problems
        if len(shown) < STRICT_SHOWN:
            shown += problems[: STRICT_SHOWN - len(shown)]

    def __enter__(self) -> "_Record":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _run(manifest: Manifest, cols: ResolvedColumns, labels: dict[str, LabelMap], staging: str,
         val_fraction: float, test_fraction: float, strict: bool, workers: int, shard_mb: int,
         progress: Callable | None) -> tuple[_Tally, dict]:
    tally = _Tally()
    schema = shard_schema(cols.media, tasks=labels)
    writers = {s: ShardWriter(staging, s, schema, max_shard_bytes=shard_mb * 2**20) for s in SPLITS}
    files = [m for m in cols.media if m != "text"]
    chunks = _checked_chunks(manifest, cols, labels, val_fraction, test_fraction, CHUNK_ROWS)
    with _Record(staging, tally) as record:
        for chunk, results in _map_media(manifest.folder, files, chunks, workers):
            for (row_no, row), media in zip(chunk, results):
                tally.rows_in += 1
                if isinstance(row, list):  # failed the row checks: rejected, media not read
                    _reject(tally, row[0].key)
                    record(row)
                else:
                    record(_finish_row(cols, row_no, row, media, tally, writers))
            if progress is not None:
                progress(tally.rows_in, manifest.num_rows, tally.kept, tally.rejected)
            if strict and tally.first_problems:
                break
    return tally, {s: w.close() for s, w in writers.items()}


# ------------------------------------------------------------------------------ on Ray: tasks write their shards
@dataclass
class ChunkResult:
    """What a chunk's task sends back: per row it was given, the problems recorded (a kept row's missing
    modalities, or what rejected it); its counts; per split, the shards it wrote."""

    problems: list[list[Problem]]
    tally: _Tally
    splits: dict[str, SplitInfo]


def prepare_chunk(folder: str, cols: ResolvedColumns, schema, root: str, index: int,
                  rows: list[tuple[int, dict]], shard_mb: int) -> ChunkResult:
    """Check, decode and write one chunk of rows that passed the row checks (a Ray task; no Ray here).

    Shards go to ``root/<split>/part-<index>.parquet`` (then ``part-<index>-001.parquet``, ... past the size cap), streamed :data:`CHUNK_ROWS` rows at a time
    (memory does not grow with the chunk). The same chunk run again writes the same files (a retried
    task overwrites its own).
    """
    tally = _Tally()
    writers = {s: ShardWriter(root, s, schema, max_shard_bytes=shard_mb * 2**20,
                              stem=f"part-{index:06d}") for s in SPLITS}
    files = [m for m in cols.media if m != "text"]
    problems: list[list[Problem]] = []
    for start in range(0, len(rows), CHUNK_ROWS):
        step = rows[start:start + CHUNK_ROWS]
        media = check_media(folder, [{m: row["_cells"][m] for m in files} for _, row in step])
        problems += [_finish_row(cols, row_no, row, m, tally, writers) for (row_no, row), m in zip(step, media)]
    return ChunkResult(problems, tally, {s: w.close() for s, w in writers.items()})


def _run_chunked(manifest: Manifest, cols: ResolvedColumns, labels: dict[str, LabelMap], staging: str,
                 val_fraction: float, test_fraction: float, strict: bool, workers: int, shard_mb: int,
                 progress: Callable | None, chunk_rows: int, run_chunks: Callable) -> tuple[_Tally, dict]:
    """The Ray path: row checks here, then one :func:`prepare_chunk` per chunk; merged in manifest order."""
    tally = _Tally()
    schema = shard_schema(cols.media, tasks=labels)
    parts: dict[str, list[SplitInfo]] = {s: [] for s in SPLITS}
    given: deque = deque()  # the chunks handed out and not merged yet (row checks run as tasks are needed)

    def jobs() -> Iterator[tuple]:
        for i, chunk in enumerate(_checked_chunks(manifest, cols, labels, val_fraction, test_fraction, chunk_rows)):
            given.append(chunk)
            yield manifest.folder, cols, schema, staging, i, [(n, r) for n, r in chunk if isinstance(r, dict)], shard_mb

    results = run_chunks(prepare_chunk, jobs(), workers)
    with contextlib.closing(results), _Record(staging, tally) as record:
        for done in results:
            chunk = given.popleft()
            kept = iter(done.problems)
            for _, row in chunk:
                tally.rows_in += 1
                if isinstance(row, list):  # failed the row checks here: rejected, media not read
                    _reject(tally, row[0].key)
                    record(row)
                else:
                    record(next(kept))
            tally.add(done.tally)
            tally.tasks += any(isinstance(r, dict) for _, r in chunk)
            for s in SPLITS:
                parts[s].append(done.splits[s])
            if progress is not None:
                progress(tally.rows_in, manifest.num_rows, tally.kept, tally.rejected)
            if strict and tally.first_problems:
                break
    modalities = [n for n in schema.names if n in cols.media]
    splits = {s: SplitInfo(rows=sum(p.rows for p in parts[s]), files=tuple(f for p in parts[s] for f in p.files),
                           present={m: sum(p.present[m] for p in parts[s]) for m in modalities}) for s in SPLITS}
    for s in SPLITS:
        for f in splits[s].files:
            if not os.path.isfile(os.path.join(staging, f)):
                raise UserError(f"--out: shard {f} was written by a Ray task on another machine, and is not in "
                                f"{staging}: on a cluster of several machines --out must be a folder every "
                                "machine shares")
    return tally, splits


def _ray_chunks(fn: Callable, jobs: Iterator[tuple], workers: int) -> Iterator[ChunkResult]:
    """``fn(*job)`` as Ray tasks (one CPU each), results in order: ``workers`` tasks in flight when given, else
    twice the cluster's CPUs (a queue, so no CPU waits on the merge).

    A job with no rows to check runs here. On exit (also a ``--strict`` stop or an error) the tasks still in
    flight are cancelled and waited for, so none writes into the staging folder after it is removed.
    """
    from mmray.runtime import ensure_ray  # Ray only on the Ray path: prepare runs without it

    ray = ensure_ray()
    task = ray.remote(num_cpus=1)(fn)
    limit = workers or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    inflight: deque = deque()
    pending = iter(jobs)
    try:
        while True:
            while len(inflight) < limit:
                job = next(pending, None)
                if job is None:
                    break
                inflight.append(task.remote(*job) if job[5] else fn(*job))
            if not inflight:
                return
            head = inflight.popleft()
            yield ray.get(head) if isinstance(head, ray.ObjectRef) else head
    finally:
        refs = [r for r in inflight if isinstance(r, ray.ObjectRef)]
        for r in refs:
            ray.cancel(r)
        for r in refs:
            with contextlib.suppress(Exception):
                ray.get(r)


def _row_checks(manifest: Manifest, cols: ResolvedColumns, labels: dict[str, LabelMap], i: int, row_no: int,
                seen_ids: dict[str, int], val_fraction: float, test_fraction: float, split_of) -> dict | list[Problem]:
    """The row (id, labels, split, cells) or the list of problems that reject it."""
    if row_no in manifest.broken:
        return [Problem(row_no, None, None, "row", "unreadable row", manifest.broken[row_no], "rejected")]
    raw_id = manifest.cell(cols.id, i) if cols.id else f"row-{row_no:08d}"
    rid = None if is_empty(raw_id) else str(raw_id).strip()
    problems: list[Problem] = []
    if rid is None:
        problems.append(Problem(row_no, None, cols.id, "id", "empty id", "", "rejected"))
    elif rid in seen_ids:
        problems.append(Problem(row_no, rid, cols.id, "id", "duplicate id", f"first at row {seen_ids[rid]}", "rejected"))
    else:
        seen_ids[rid] = row_no
    row: dict[str, Any] = {"id": rid}
    for task, lm in labels.items():
        value, reason, detail = lm.encode(manifest.cell(lm.column, i))
        if reason:
            problems.append(Problem(row_no, rid, lm.column, task, reason, detail, "rejected"))
        row[task] = value
    if cols.split:
        cell = manifest.cell(cols.split, i)
        split = SPLIT_ALIASES.get(str(cell).strip().lower()) if not is_empty(cell) else None
        if split is None:
            problems.append(Problem(row_no, rid, cols.split, "split", "unknown split",
                                    f"{cell!r} is not train, val or test", "rejected"))
        row["_split"] = split
    elif rid is not None:
        row["_split"] = split_of(rid, val_fraction, test_fraction)
    if problems:
        return problems
    row["_cells"] = {m: manifest.cell(c, i) for m, c in cols.media.items()}
    return row


def _map_media(folder: str, files: list[str], chunks: Iterator[list[tuple[int, dict]]], workers: int):
    """``(chunk, media results)`` in manifest order; at most ``2 * workers`` chunks in flight (bounded memory)."""
    def cells(chunk):  # nothing to read for a row already rejected
        return [{m: row["_cells"][m] for m in files} if isinstance(row, dict) else {} for _, row in chunk]

    if workers <= 1:
        for chunk in chunks:
            yield chunk, check_media(folder, cells(chunk))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: workers start in milliseconds, and unlike spawn it never re-runs the
    # caller's __main__ (a user script without a main guard). Workers only touch PIL and soundfile.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        inflight: deque = deque()
        try:
            for chunk in chunks:
                inflight.append((chunk, pool.submit(check_media, folder, cells(chunk))))
                if len(inflight) >= 2 * workers:
                    done_chunk, fut = inflight.popleft()
                    yield done_chunk, fut.result()
            while inflight:
                done_chunk, fut = inflight.popleft()
                yield done_chunk, fut.result()
        finally:
            for _, fut in inflight:
                fut.cancel()


def _finish_row(cols: ResolvedColumns, row_no: int, row: dict, media: dict, tally: _Tally,
                writers: dict[str, ShardWriter]) -> list[Problem]:
    """Assemble a row that passed the row checks; write it, or reject it when no modality is usable."""
    rid = row["id"]
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    missing: list[Problem] = []
    formats: dict[str, str] = {}
    for m, col in cols.media.items():
        if m == "text":
            cell = row["_cells"]["text"]
            if is_empty(cell):
                out["text"] = None
                missing.append(Problem(row_no, rid, col, "text", "empty text", "", "missing"))
            else:
                out["text"] = str(cell)
            continue
        data, fmt, reason, detail = media[m]
        out[m] = data
        if data is None:
            missing.append(Problem(row_no, rid, col, m, reason, detail, "missing"))
        else:
            formats[m] = fmt
    if all(out[m] is None for m in cols.media):
        problems = [Problem(p.row, p.id, p.column, p.field, p.reason, p.detail, "rejected") for p in missing]
        problems.append(Problem(row_no, rid, None, "row", "no usable modality", "", "rejected"))
        _reject(tally, problems[-1].key)
        return problems
    tally.kept += 1
    if missing:
        tally.partly_missing += 1
        tally.missing_by_reason.update(p.key for p in missing)
    for m, fmt in formats.items():
        tally.formats.setdefault(m, Counter())[fmt] += 1
    writers[row["_split"]].write(out)
    return missing


def _reject(tally: _Tally, key: str) -> None:
    """Count a rejected row once, under the reason that decided it (so the reasons add up to the rows)."""
    tally.rejected += 1
    tally.rejected_by_reason[key] += 1


def _finish(staging: str, out: str, manifest: Manifest, cols: ResolvedColumns, labels: dict[str, LabelMap],
            splits: dict, tally: _Tally, command: str | None) -> DatasetInfo:
    """Tokenizer (when there is text), ``dataset.json``; returns the info (its path still the staging folder)."""
    tokenizer = None
    if "text" in cols.media:
        tokenizer = "tokenizer/tokenizer.json"
        train_files = [os.path.join(staging, f) for f in splits["train"].files]
        train_tokenizer(_texts(train_files, TOKENIZER_MAX_TEXTS), os.path.join(staging, tokenizer))
    created = created_record(command, os.path.abspath(manifest.path))
    created["columns"] = {"id": cols.id, "label": cols.label, "split": cols.split, **cols.media, **cols.tasks}
    info = DatasetInfo(
        path=staging,
        modalities=tuple(cols.media),
        class_names=labels["label"].class_names,
        tasks={k: lm.class_names for k, lm in labels.items()},
        splits=splits,
        rejected={
            "rows": tally.rejected,
            "by_reason": dict(_by_count(tally.rejected_by_reason)),
            "rows_in": tally.rows_in,
            "kept": tally.kept,
            "partly_missing": tally.partly_missing,
            "missing_by_reason": dict(_by_count(tally.missing_by_reason)),
            "file": "rejected.jsonl",
        },
        tokenizer=tokenizer,
        media={m: {"formats": dict(_by_count(c))} for m, c in sorted(tally.formats.items())},
        created=created,
    )
    write_dataset_info(info)
    return info


class PrepareProgress:
    """A live bar on a terminal; elsewhere one parseable line every ``every_s`` seconds (and at the end)."""

    def __init__(self, stream=None, tty: bool | None = None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._started = time.perf_counter()
        self._last = 0.0
        self._bar = None
        self._ended = False

    def __call__(self, done: int, total: int, kept: int, rejected: int) -> None:
        elapsed = max(1e-9, time.perf_counter() - self._started)
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="row", file=self.stream, desc="prepare", dynamic_ncols=True)
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix(kept=kept, rejected=rejected, refresh=False)
            if done >= total:
                self._bar.close()
            return
        if self._ended or (done < total and elapsed - self._last < self.every_s):
            return
        self._last, self._ended = elapsed, done >= total
        self.stream.write(f"mmray prepare rows={done}/{total} kept={kept} rejected={rejected} "
                          f"rows_per_s={done / elapsed:.0f}\n")
        self.stream.flush()

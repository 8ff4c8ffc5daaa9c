"""The dataset directory: ``dataset.json`` plus Parquet shards per split.

Layout (see PRODUCT.md)::

    DIR/dataset.json
    DIR/train/part-00000.parquet ...
    DIR/val/part-00000.parquet ...
    DIR/test/part-00000.parquet ...
    DIR/tokenizer/tokenizer.json      (synth: a WordPiece tokenizer trained on the train texts)

Shard columns: ``id`` string, ``label`` int64 (+ ``label_<task>`` int64), ``image`` binary (encoded
PNG/JPEG/WebP bytes), ``text`` string, ``audio`` binary (encoded WAV/FLAC bytes). A null cell is a
missing modality. ``DIR`` may be a local path or a pyarrow URI (``s3://``, ``gs://``).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from mmray import storage
from mmray.config.errors import UserError

SCHEMA_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
MEDIA_COLUMNS: tuple[str, ...] = ("audio", "image", "text")  # = the modality names, sorted
MMRAY_VERSION = "0.1.0"

# Parquet physical types of the shard columns; label_<task> columns are int64 like label.
COLUMN_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(),
    "label": pa.int64(),
    "image": pa.binary(),
    "text": pa.string(),
    "audio": pa.binary(),
}


def shard_schema(modalities: Iterable[str], tasks: Iterable[str] = ("label",)) -> pa.Schema:
    """The Arrow schema of a shard holding ``modalities`` and the label columns of ``tasks``.

    Column order: id, label columns (sorted, ``label`` first), then modalities in sorted order.
    """
    label_cols = ["label"] + sorted(t for t in tasks if t != "label")
    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(c, pa.int64()) for c in label_cols]
    fields += [pa.field(m, COLUMN_TYPES[m]) for m in sorted(modalities)]
    return pa.schema(fields)


# ------------------------------------------------------------------------------ filesystem
resolve_fs = storage.resolve  # (filesystem, path inside it) for a local path or a URI
_join = storage.join
read_text = storage.read_text


# ------------------------------------------------------------------------------ dataset.json
@dataclass(frozen=True)
class SplitInfo:
    """One split: its row count and its shard files (relative to the dataset directory)."""

    rows: int
    files: tuple[str, ...]
    present: Mapping[str, int] | None = None  # modality -> non-null rows (None: not recorded)


@dataclass(frozen=True)
class DatasetInfo:
    """The parsed ``dataset.json`` of a dataset directory at ``path``.

    Attributes:
        path: the dataset directory (absolute local path, or a URI).
        modalities: modality columns present in the shards, sorted.
        class_names: names of the main task's classes; index = label id.
        tasks: task name -> class names; ``"label"`` is the main task, others are ``label_<task>`` columns.
        splits: split name -> :class:`SplitInfo`.
        rejected: ``{"rows": int, "by_reason": {reason: count}}`` from ``data prepare``.
        tokenizer: path of the dataset's own tokenizer file relative to ``path``, or None.
        media: per-modality encoding facts, e.g. ``{"audio": {"format": "wav", "sample_rate": 16000}}``.
        created: how the dataset was made (command, source, time, mmray_version).
    """

    path: str
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    tasks: Mapping[str, tuple[str, ...]]
    splits: Mapping[str, SplitInfo]
    rejected: Mapping[str, Any] = field(default_factory=lambda: {"rows": 0, "by_reason": {}})
    tokenizer: str | None = None
    media: Mapping[str, Any] = field(default_factory=dict)
    created: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def split_files(self, split: str) -> list[str]:
        """Absolute paths (or URIs) of the shards of ``split``.

        Raises:
            UserError: the split is not in this dataset.
        """
        return [_join(self.path, f) for f in self._split(split).files]

    def split_rows(self, split: str) -> int:
        return self._split(split).rows

    def num_classes(self, task: str = "label") -> int:
        """Number of classes of ``task`` (``"label"`` or a ``label_<task>`` column name)."""
        if task not in self.tasks:
            raise UserError(f"{self.path}: no task {task!r}; tasks: {', '.join(sorted(self.tasks))}")
        return len(self.tasks[task])

    @property
    def tokenizer_path(self) -> str | None:
        """Absolute path of the dataset's own tokenizer file, or None."""
        return _join(self.path, self.tokenizer) if self.tokenizer else None

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise UserError(f"{self.path}: no split {split!r}; splits: {', '.join(self.splits)}")
        return self.splits[split]

    def to_json(self) -> dict[str, Any]:
        """The ``dataset.json`` document (without ``path``)."""
        return {
            "schema_version": self.schema_version,
            "modalities": list(self.modalities),
            "class_names": list(self.class_names),
            "tasks": {k: list(v) for k, v in self.tasks.items()},
            "splits": {k: _split_json(s) for k, s in self.splits.items()},
            "rejected": dict(self.rejected),
            "tokenizer": self.tokenizer,
            "media": dict(self.media),
            "created": dict(self.created),
        }


def _split_json(s: SplitInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"rows": s.rows, "files": list(s.files)}
    if s.present is not None:
        doc["present"] = dict(s.present)
    return doc


def read_dataset_info(path: str) -> DatasetInfo:
    """Read ``path/dataset.json``.

    Raises:
        UserError: the directory or ``dataset.json`` is missing, not JSON, or lacks required keys.
    """
    meta = storage.join(path, "dataset.json")
    if not storage.is_file(meta):
        raise UserError(
            f"{path}: not a dataset directory (no dataset.json); make one with `mmray data synth --out {path}` "
            "or `mmray data prepare`"
        )
    try:
        doc = json.loads(storage.read_text(meta))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}/dataset.json: not valid JSON: {e}") from None
    return _parse(storage.normalize(path), doc)


def _parse(path: str, doc: Any) -> DatasetInfo:
    where = f"{path}/dataset.json"
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object")
    missing = [k for k in ("schema_version", "modalities", "class_names", "splits") if k not in doc]
    if missing:
        raise UserError(f"{where}: missing keys {', '.join(missing)}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {doc['schema_version']!r} is not supported (expected {SCHEMA_VERSION})")
    mods = doc["modalities"]
    bad = [m for m in mods if m not in MEDIA_COLUMNS] if isinstance(mods, list) else [mods]
    if bad or not mods:
        raise UserError(f"{where}: modalities must be a non-empty list of {', '.join(MEDIA_COLUMNS)}; got {mods!r}")
    try:
        splits = {
            name: SplitInfo(
                rows=int(s["rows"]),
                files=tuple(str(f) for f in s["files"]),
                present={k: int(v) for k, v in s["present"].items()} if s.get("present") is not None else None,
            )
            for name, s in doc["splits"].items()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: splits must map a split name to {{rows, files}}: {e!r}") from None
    class_names = tuple(str(c) for c in doc["class_names"])
    tasks = {k: tuple(str(c) for c in v) for k, v in (doc.get("tasks") or {"label": class_names}).items()}
    tasks.setdefault("label", class_names)
    return DatasetInfo(
        path=path,
        modalities=tuple(sorted(mods)),
        class_names=class_names,
        tasks=tasks,
        splits=splits,
        rejected=doc.get("rejected") or {"rows": 0, "by_reason": {}},
        tokenizer=doc.get("tokenizer"),
        media=doc.get("media") or {},
        created=doc.get("created") or {},
        schema_version=doc["schema_version"],
    )


# Column kinds a shard may hold, by what decoding reads: any width of integer labels, (large) strings, bytes.
_COLUMN_KINDS: dict[str, tuple[str, Any]] = {
    "id": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)),
    "label": ("int64", pa.types.is_integer),
    "image": ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    "audio": ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    "text": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
}
HOW_TO_MAKE = ("remake the dataset with `mmray data prepare MANIFEST --out DIR --split-fractions 0.8,0.1,0.1` "
               "(or `mmray data synth --out DIR`)")


def check_shards(info: DatasetInfo, modalities: Iterable[str], required: Iterable[str] = ("train", "val")) -> dict[str, int]:
    """Every shard of every split is there, is Parquet, and has the columns ``dataset.json`` promises with the
    types decoding reads; each ``required`` split has rows. Only the Parquet footers are read.

    Returns:
        split -> rows, as counted from the footers.

    Raises:
        UserError: naming the shard (missing, truncated or damaged, a column missing or of another type),
            or the split that has 0 rows and how to make one.
    """
    columns = ["id", *info.tasks, *modalities]
    rows: dict[str, int] = {}
    for split in info.splits:
        rows[split] = 0
        for rel, shard in zip(info.splits[split].files, info.split_files(split)):
            if not storage.is_file(shard):
                raise UserError(f"{shard}: shard missing (dataset.json lists {rel} in split {split!r}); "
                                f"restore it or {HOW_TO_MAKE}")
            fs, inner = resolve_fs(shard)
            try:
                with fs.open_input_file(inner) as fh:
                    meta = pq.ParquetFile(fh).metadata
                    schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{shard}: not a readable Parquet shard, truncated or damaged ({e}); "
                                f"restore it or {HOW_TO_MAKE}") from None
            for column in columns:
                expected, fits = _COLUMN_KINDS["label" if column.startswith("label") else column]
                if column not in schema.names:
                    raise UserError(f"{shard}: column {column!r} missing (dataset.json promises it; "
                                    f"the shard has {', '.join(schema.names)})")
                actual = schema.field(column).type
                if not fits(actual):
                    raise UserError(f"{shard}: column {column!r} is {actual}, expected {expected} "
                                    f"(the shard does not match dataset.json)")
            rows[split] += meta.num_rows
    for split in required:
        if split not in rows:
            raise UserError(f"{info.path}: no {split} split in dataset.json; a run needs train and val rows: {HOW_TO_MAKE}")
        if rows[split] == 0:
            raise UserError(f"{info.path}: {split} split has 0 rows; a run needs rows in train and val "
                            f"(val picks the best epoch): {HOW_TO_MAKE}")
    return rows


def write_dataset_info(info: DatasetInfo) -> str:
    """Write ``info.path/dataset.json`` (atomically for local paths); returns its path."""
    text = json.dumps(info.to_json(), indent=2) + "\n"
    meta = storage.join(info.path, "dataset.json")
    storage.write_text(meta, text)
    return meta


def created_record(command: str | None, source: str) -> dict[str, Any]:
    """The ``created`` section: command, source, UTC time and mmray version."""
    return {
        "command": command,
        "source": source,
        "time": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "mmray_version": MMRAY_VERSION,
    }


# ------------------------------------------------------------------------------ shard writer
class ShardWriter:
    """Streams rows of one split into size-bounded Parquet shards ``DIR/<split>/part-NNNNN.parquet``.

    Rows are buffered up to ``row_group_rows`` and written as one row group, so memory stays flat
    however many rows are written. A new shard starts when the current one reaches ``rows_per_shard``
    rows or ``max_shard_bytes`` bytes of encoded data (whichever comes first).

    Example::

        with ShardWriter(out, "train", shard_schema(["image", "text"])) as w:
            for row in rows:
                w.write(row)          # {"id": ..., "label": ..., "image": b"...", "text": "..."}
        w.files, w.rows               # relative shard paths, row count

    Args:
        root: the dataset directory (a local path or a URI).
        split: split name; the folder shards go into.
        schema: Arrow schema of every shard (see :func:`shard_schema`).
        rows_per_shard: start a new shard after this many rows; None = by size only.
        max_shard_bytes: start a new shard after this many bytes of row data.
        row_group_rows: rows per Parquet row group (the unit readers stream and shuffle).
        stem: name the shards ``<stem>.parquet``, ``<stem>-001.parquet``, ... instead of
            ``part-00000.parquet``, ``part-00001.parquet``, ... (one writer per shard, several writers at once).
    """

    def __init__(
        self,
        root: str,
        split: str,
        schema: pa.Schema,
        *,
        rows_per_shard: int | None = None,
        max_shard_bytes: int = 256 * 2**20,
        row_group_rows: int = 256,
        stem: str | None = None,
    ):
        self.root, self.split, self.schema, self.stem = root, split, schema, stem
        self.rows_per_shard = rows_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.row_group_rows = row_group_rows
        self.files: list[str] = []
        self.rows = 0
        self._buf: dict[str, list] = {n: [] for n in schema.names}
        self._buf_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self._shard_bytes = 0
        self._modalities = [n for n in schema.names if n in MEDIA_COLUMNS]
        self.present = {m: 0 for m in self._modalities}
        storage.makedirs(storage.join(root, split))

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (a mapping with every schema column; None = null)."""
        for name in self.schema.names:
            self._buf[name].append(row.get(name))
        for m in self._modalities:
            self.present[m] += row.get(m) is not None
        self._buf_rows += 1
        if self._buf_rows >= self._room():
            self._flush()

    def _room(self) -> int:
        # Rows that fit in the current shard before it must roll over, capped by the row group size.
        if self.rows_per_shard is None:
            return self.row_group_rows
        return max(1, min(self.row_group_rows, self.rows_per_shard - self._shard_rows))

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        table = pa.Table.from_pydict(self._buf, schema=self.schema)
        if self._writer is None:
            n = len(self.files)
            name = f"part-{n:05d}" if self.stem is None else self.stem + (f"-{n:03d}" if n else "")
            rel = f"{self.split}/{name}.parquet"
            self.files.append(rel)
            fs, inner = resolve_fs(storage.join(self.root, rel))
            # Media bytes are already compressed (PNG/WAV...); zstd still shrinks text and WAV a little.
            self._writer = pq.ParquetWriter(
                inner, self.schema, filesystem=fs, compression="zstd", write_statistics=["id", "label"],
                write_page_checksum=True,  # readers verify every page: damaged bytes are never decoded as data
            )
        self._writer.write_table(table, row_group_size=self._buf_rows)
        self.rows += self._buf_rows
        self._shard_rows += self._buf_rows
        self._shard_bytes += table.nbytes
        self._buf = {n: [] for n in self.schema.names}
        self._buf_rows = 0
        full_rows = self.rows_per_shard is not None and self._shard_rows >= self.rows_per_shard
        if full_rows or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shard_rows = self._shard_bytes = 0

    def close(self) -> SplitInfo:
        """Flush and close; returns the split's :class:`SplitInfo`."""
        self._flush()
        self._close_shard()
        return SplitInfo(rows=self.rows, files=tuple(self.files), present=dict(self.present))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Reading a user's manifest for ``mmray data prepare``: CSV, JSONL or Parquet, columns mapped by flag.

A manifest has one row per sample. Its cells are kept as read (CSV cells are strings, JSONL and
Parquet cells keep their JSON/Arrow types) so a label column can be judged integer or not as a whole.
The manifest itself (ids, paths, captions: ~100 bytes a row) is held in memory; media files are not.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mmray.config.errors import UserError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MODALITY_FLAGS = {"image": "--image-col", "text": "--text-col", "audio": "--audio-col"}
LABEL_TYPES = ("auto", "int", "str")
_INT = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class ColumnMap:
    """Which manifest column holds what. ``None`` means "use the default if the manifest has it".

    Attributes:
        id: ids (unique strings); without one, rows are named ``row-<number>``.
        label: the main label column (required).
        split: a column of train/val/test; without one the split is a hash of the id.
        media: modality -> column (image and audio cells are file paths, text cells are the text).
        tasks: extra task name -> column, written as ``label_<task>``.
    """

    id: str | None = None
    label: str | None = None
    split: str | None = None
    media: Mapping[str, str | None] = field(default_factory=dict)
    tasks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedColumns:
    """The columns actually used, all present in the manifest."""

    id: str | None
    label: str
    split: str | None
    media: dict[str, str]  # modality -> column, sorted by modality
    tasks: dict[str, str]  # "label_<task>" -> column


@dataclass
class Manifest:
    """A loaded manifest: ``columns`` maps each column name to its cells (one per row, in file order).

    ``broken`` maps a row number to why that row could not be parsed (JSONL only); such a row's cells are None.
    Row numbers are 1-based positions among the data rows (a CSV header is not a row).
    """

    path: str
    format: str
    columns: dict[str, list[Any]]
    num_rows: int
    broken: dict[int, str] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """Media paths are relative to this folder."""
        return os.path.dirname(os.path.abspath(self.path))

    def cell(self, column: str | None, index: int) -> Any:
        return None if column is None else self.columns[column][index]


def load_manifest(path: str) -> Manifest:
    """Read a CSV, JSONL or Parquet manifest (format from the file extension).

    Raises:
        UserError: the file is missing, its extension is not one of FORMATS, or it cannot be parsed at all.
    """
    if not os.path.isfile(path):
        raise UserError(f"MANIFEST: {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"MANIFEST: {path}: unknown format {ext or '(no extension)'!r}; "
                        f"use one of {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[ext]
    try:
        if fmt == "csv":
            columns, broken = _read_csv(path), {}
        elif fmt == "jsonl":
            columns, broken = _read_jsonl(path)
        else:
            columns, broken = _read_parquet(path), {}
    except UserError:
        raise
    except Exception as e:  # a parser error: the whole file is unreadable
        raise UserError(f"MANIFEST: {path}: cannot read as {fmt}: {e}") from None
    n = len(next(iter(columns.values()))) if columns else 0
    if n == 0:
        raise UserError(f"MANIFEST: {path}: has no rows")
    return Manifest(path=path, format=fmt, columns=columns, num_rows=n, broken=broken)


def _read_csv(path: str) -> dict[str, list[Any]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise UserError(f"MANIFEST: {path}: empty CSV (no header row)")
        names = [h.strip() for h in header]
        columns: dict[str, list[Any]] = {n: [] for n in names}
        for record in reader:
            if not any(c.strip() for c in record):
                continue  # a blank line is not a row
            for i, n in enumerate(names):
                columns[n].append(record[i] if i < len(record) else None)
    return columns


def _read_jsonl(path: str) -> tuple[dict[str, list[Any]], dict[int, str]]:
    rows: list[dict] = []
    broken: dict[int, str] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = None
                detail = f"not valid JSON: {e}"
            else:
                detail = f"not a JSON object: {line.strip()[:60]}"
            if not isinstance(obj, dict):
                broken[len(rows) + 1] = detail
                obj = {}
            rows.append(obj)
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    return {n: [r.get(n) for r in rows] for n in names}, broken


def _read_parquet(path: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.column(name).to_pylist() for name in table.column_names}


def resolve_columns(manifest: Manifest, wanted: ColumnMap) -> ResolvedColumns:
    """Check the column mapping against the manifest; defaults are the modality / ``id`` / ``label`` / ``split`` names.

    Raises:
        UserError: a column given by flag is not in the manifest, there is no label column, or no modality column.
    """
    have = list(manifest.columns)
    problems: list[str] = []

    def pick(flag: str, given: str | None, default: str | None) -> str | None:
        if given is not None:
            if given not in manifest.columns:
                problems.append(f"{flag}: column {given!r} is not in the manifest")
                return None
            return given
        return default if default is not None and default in manifest.columns else None

    id_col = pick("--id-col", wanted.id, "id")
    label = pick("--label-col", wanted.label, "label")
    if label is None and wanted.label is None:
        problems.append("--label-col: the manifest has no 'label' column; name the label column with --label-col")
    split = pick("--split-col", wanted.split, "split")
    media = {}
    for m in sorted(MODALITY_FLAGS):
        col = pick(MODALITY_FLAGS[m], wanted.media.get(m), m)
        if col is not None:
            media[m] = col
    tasks = {}
    for task, col in sorted(wanted.tasks.items()):
        if not re.fullmatch(r"[A-Za-z0-9_]+", task) or task == "label":
            problems.append(f"--task-col: task name {task!r} must be letters, digits or _ (and not 'label')")
        elif pick("--task-col", col, None) is not None:
            tasks[f"label_{task}"] = col
    if not media and not problems:
        problems.append("no modality column: the manifest has none of image, text, audio; "
                        "map yours with --image-col, --text-col or --audio-col")
    if problems:
        raise UserError(f"MANIFEST {manifest.path}:\n" + "\n".join(f"  {p}" for p in problems)
                        + f"\n  (its columns: {', '.join(have)})")
    return ResolvedColumns(id=id_col, label=label, split=split, media=media, tasks=tasks)


# ------------------------------------------------------------------------------ labels
def is_empty(value: Any) -> bool:
    """None, NaN, or a blank string."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def as_int(value: Any) -> int | None:
    """The integer a cell holds (``3``, ``"3"``, ``3.0``), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    return None


@dataclass(frozen=True)
class LabelMap:
    """How one label column's cells become label ids.

    ``kind`` is ``int`` (the cells are ids 0..N-1; class names are "0".."N-1") or ``str`` (the
    distinct values, sorted, are the class names; id = position).
    """

    column: str
    kind: str
    class_names: tuple[str, ...]

    @classmethod
    def fit(cls, column: str, cells: Sequence[Any], label_type: str = "auto") -> "LabelMap":
        """Judge the column from all its cells: ``auto`` = integer when at least half the non-empty cells are integers.

        Raises:
            UserError: the column has no usable label at all.
        """
        values = [v for v in cells if not is_empty(v)]
        ints = [i for i in (as_int(v) for v in values) if i is not None]
        kind = label_type if label_type != "auto" else ("int" if values and len(ints) * 2 >= len(values) else "str")
        if kind == "int":
            good = [i for i in ints if i >= 0]
            if not good:
                raise UserError(f"--label-col {column!r}: no non-negative integer label in the column")
            names = tuple(str(i) for i in range(max(good) + 1))
        else:
            names = tuple(sorted({_label_str(v) for v in values}))
            if not names:
                raise UserError(f"--label-col {column!r}: every label is empty")
        return cls(column=column, kind=kind, class_names=names)

    def encode(self, value: Any) -> tuple[int | None, str | None, str]:
        """``(label id, None, "")`` or ``(None, reason, detail)`` for a cell that is not a usable label."""
        if is_empty(value):
            return None, "empty label", ""
        if self.kind == "str":
            return self._index[_label_str(value)], None, ""
        i = as_int(value)
        if i is None:
            return None, "label is not an integer", f"{value!r} in integer column {self.column!r}"
        if i < 0:
            return None, "negative label", str(i)
        return i, None, ""

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {n: i for i, n in enumerate(self.class_names)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


def _label_str(value: Any) -> str:
    return str(value).strip()

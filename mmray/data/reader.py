"""In-process batch reader (no Ray): streams a split's shards with pyarrow and decodes with :class:`Preprocessor`.

Used for local training, evaluation and predict. Memory is bounded by the shuffle window (a few
thousand rows), never by the size of the split.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmray.config.errors import UserError
from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info, resolve_fs
from mmray.data.decode import DAMAGED, Preprocessor

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Shuffle:
    """An epoch's order under ``data.shuffle``, for every in-process reader (shards, embedding cache, decoded
    cache), so each means what the Ray pipeline means by it. ``units``: files, then row groups within a file, in
    a per-epoch seeded order; ``window``: rows gathered before a batch goes out; ``mix``: those rows permuted.

    ``files``: units only. ``local``: units + windows of ``data.shuffle_buffer_rows`` (at least a batch).
    ``global``: units + one window of the whole split (every row held: a full permutation). ``none``, or not
    training: file order.
    """

    units: bool
    window: int
    mix: bool

    @classmethod
    def of(cls, mode: str, buffer_rows: int, batch_size: int, train: bool = True) -> "Shuffle":
        mode = mode if train else "none"
        if mode == "local":
            return cls(True, max(buffer_rows, batch_size), True)
        if mode == "global":
            return cls(True, sys.maxsize, True)
        return cls(mode == "files", batch_size, False)

    @classmethod
    def for_data(cls, data: DataConfig, batch_size: int, train: bool) -> "Shuffle":
        return cls.of(data.shuffle, data.shuffle_buffer_rows, batch_size, train)

    @classmethod
    def default(cls, batch_size: int, train: bool) -> "Shuffle":
        """The order with the schema's default ``data.shuffle`` (readers not given a job's data section)."""
        fields = DataConfig.model_fields
        return cls.of(fields["shuffle"].default, fields["shuffle_buffer_rows"].default, batch_size, train)


def iter_batches(
    data: DataConfig,
    info: DatasetInfo,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool | None = None,
    with_ids: bool = False,
    preprocessor: Preprocessor | None = None,
) -> Iterator[dict]:
    """Yield decoded batches of ``split`` as torch tensors; every row exactly once per call.

    Args:
        data: the job's ``data`` section (modalities, preprocessing, on_bad_record).
        info: the dataset.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: rows per batch (the last batch may be smaller).
        train: augment images (with ``data.image.augment``); also the default for ``shuffle``.
        seed, epoch: seed the shuffle and augmentation; a new epoch gives a new order.
        shuffle: order the epoch by ``data.shuffle`` (see :class:`Shuffle`); False = file order;
            default = ``train``.
        with_ids: add ``"id"``: list[str] to each batch (for predict).
        preprocessor: reuse this preprocessor (e.g. to avoid reloading a tokenizer every epoch).

    Yields:
        ``dict[str, torch.Tensor]`` in the batch format of :mod:`mmray.data.decode`, plus ``"id"``
        when ``with_ids``.

    Raises:
        UserError: unknown split or bad ``batch_size``; BadRecordError with ``on_bad_record: fail``.
    """
    import torch

    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    order = Shuffle.for_data(data, batch_size, train if shuffle is None else shuffle)
    rng = np.random.default_rng([seed, epoch])
    pre = preprocessor or Preprocessor(data, info, train=train, seed=int(rng.integers(2**31)))
    for table in _batches(_chunks(data, info, split, order.units, rng), batch_size, order.window,
                          rng if order.mix else None):
        columns = table_columns(table)
        out = {k: torch.from_numpy(v) for k, v in pre(columns).items()}
        if with_ids:
            out["id"] = [str(i) for i in columns["id"]]
        yield out


def row_group_units(info: DatasetInfo, split: str) -> list[tuple[str, int]]:
    """``(shard path, row group index)`` for every row group of ``split``: the unit of parallel reading.

    Reads only the Parquet footers.
    """
    units = []
    for f in info.split_files(split):
        fs, inner = resolve_fs(f)
        with fs.open_input_file(inner) as fh:
            units += [(f, g) for g in range(pq.ParquetFile(fh).num_row_groups)]
    return units


def read_row_group(path: str, group: int, data: DataConfig, info: DatasetInfo) -> pa.Table:
    """One row group of a shard, only the columns decoding needs (id, label columns, configured modalities).

    Pages are verified against their checksums (shards mmray writes carry them). A row group that does not
    read whole comes back with its unreadable columns as nulls and a :data:`~mmray.data.decode.DAMAGED`
    column naming the damage on every row: the decoder counts those rows as bad records, or fails naming
    the shard and row group under ``data.on_bad_record: fail``. Said once per row group in the log.
    """
    fs, inner = resolve_fs(path)
    with fs.open_input_file(inner) as fh:
        pf = pq.ParquetFile(fh, page_checksum_verification=True)
        wanted = {"id", *data.modalities, *info.tasks}
        columns = [c for c in pf.schema_arrow.names if c in wanted]
        try:
            return pf.read_row_group(int(group), columns=columns)
        except (OSError, pa.ArrowException):
            return _salvaged(pf, path, int(group), columns)


def _salvaged(pf: pq.ParquetFile, path: str, group: int, columns: list[str]) -> pa.Table:
    """The damaged row group ``group`` of ``path``: each column read alone, the unreadable ones as nulls."""
    n = pf.metadata.row_group(group).num_rows
    arrays, damaged, first = [], [], ""
    for name in columns:
        try:
            arrays.append(pf.read_row_group(group, columns=[name]).column(name))
        except (OSError, pa.ArrowException) as e:
            damaged.append(name)
            first = first or str(e).splitlines()[0]
            arrays.append(pa.nulls(n, pf.schema_arrow.field(name).type))
    table = pa.Table.from_arrays(arrays, names=columns)
    if "id" in damaged:  # rows still need names for the record of what was skipped
        table = table.set_column(columns.index("id"), "id",
                                 pa.array([f"{path}#row-group-{group}/{i}" for i in range(n)], pa.string()))
    where = f"damaged data in shard {path}, row group {group} ({n} rows): {first}"
    log.warning("skipping %s rows of %s: %s", n, ", ".join(damaged) or "every column", where)
    return table.append_column(DAMAGED, pa.array([f"{','.join(damaged)}: {where}"] * n, pa.string()))


def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow table -> column name -> numpy array (binary/string columns as object arrays, None for null)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _chunks(
    data: DataConfig, info: DatasetInfo, split: str, shuffle: bool, rng: np.random.Generator
) -> Iterator[pa.Table]:
    """Row groups of the split's shards, in file order or shuffled (files, then groups within a file)."""
    units = row_group_units(info, split)
    if shuffle:
        units = shuffled_units(units, rng)
    for path, group in units:
        yield read_row_group(path, group, data, info)


def shuffled_units(units: list[tuple[str, int]], rng: np.random.Generator) -> list[tuple[str, int]]:
    """``(file, row group)`` units shuffled as the reader does: files, then groups within a file.

    The embedding cache replays this order on its own parts, so cached training sees the same batches.
    """
    files = list(dict.fromkeys(f for f, _ in units))
    groups = {f: [g for ff, g in units if ff == f] for f in files}
    return [(files[i], g) for i in rng.permutation(len(files)) for g in rng.permutation(groups[files[i]])]


def _batches(chunks: Iterator[pa.Table], batch_size: int, window: int, rng: np.random.Generator | None):
    """Re-cut tables into ``batch_size`` rows; with ``rng``, permute each window of >= ``window`` rows first."""
    held = Held()
    for ids in batch_rows((held.add(c, c.num_rows) for c in chunks), batch_size, window, rng):
        numbers, local = held.locate(ids)
        used = sorted(set(numbers.tolist()))
        offsets = np.cumsum([0] + [held.chunks[k].num_rows for k in used])
        where = np.searchsorted(used, numbers)
        yield _concat([held.chunks[k] for k in used]).take(offsets[where] + local)
        held.done(numbers)


class Held:
    """The chunks a reader holds while :func:`batch_rows` may still hand out one of their rows; a chunk is let go
    once every one of its rows went out in a batch (memory stays at about one shuffle window)."""

    def __init__(self):
        self.chunks: dict[int, object] = {}
        self.starts: list[int] = []
        self.left: dict[int, int] = {}
        self.total = 0

    def add(self, chunk, rows: int) -> int:
        number = len(self.starts)
        self.chunks[number], self.left[number] = chunk, rows
        self.starts.append(self.total)
        self.total += rows
        if rows == 0:
            self.done(np.zeros(0, dtype=np.int64))
        return rows

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers -> (chunk numbers, rows within those chunks)."""
        numbers = np.searchsorted(self.starts, ids, side="right") - 1
        return numbers, ids - np.asarray(self.starts)[numbers]

    def done(self, numbers: np.ndarray) -> None:
        for k, n in zip(*np.unique(numbers, return_counts=True)):
            self.left[int(k)] -= int(n)
        for k in [k for k, n in self.left.items() if n == 0]:
            del self.left[k], self.chunks[k]


def batch_rows(sizes: Iterator[int], batch_size: int, window: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """The order of every reader: chunks of ``sizes`` rows (numbered on from 0 across chunks) -> each batch's row
    numbers. Rows gather until ``window`` are pending; with ``rng`` the pending rows are permuted; full batches go
    out and the rest waits for the next window. Readers of shards and of caches share it, so the same seed gives
    the same batches whichever of them serves an epoch."""
    pending = np.zeros(0, dtype=np.int64)
    total = 0
    for n in sizes:
        pending = np.concatenate([pending, np.arange(total, total + n, dtype=np.int64)])
        total += n
        if len(pending) >= window:
            order = pending if rng is None else pending[rng.permutation(len(pending))]
            full = (len(order) // batch_size) * batch_size
            for start in range(0, full, batch_size):
                yield order[start:start + batch_size]
            pending = order[full:]
    if len(pending):
        order = pending if rng is None else pending[rng.permutation(len(pending))]
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]


def _concat(tables: list[pa.Table]) -> pa.Table:
    # a damaged row group carries one more column (DAMAGED): the others get nulls there
    return pa.concat_tables(tables, promote_options="default")


def split_readers(config):
    """``(train_batches, val_batches)``: ``epoch -> batches`` read straight from the dataset's shards."""
    info = read_dataset_info(config.data.path)
    bs, seed = config.train.batch_size, config.train.seed

    def train_batches(epoch: int):
        return iter_batches(config.data, info, "train", batch_size=bs, train=True, seed=seed, epoch=epoch)

    def val_batches(epoch: int):
        return iter_batches(config.data, info, "val", batch_size=bs, train=False, seed=seed, epoch=epoch)

    return train_batches, val_batches

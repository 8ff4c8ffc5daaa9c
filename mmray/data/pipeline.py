"""The Ray Data pipeline: Parquet shards -> decoded numpy batches, streamed (the only Ray file in mmray.data).

Shape of the pipeline: one tiny block per Parquet **row group** (``from_items`` of
``(path, row group)``), then a single ``map_batches`` that reads that row group and decodes it with
:class:`~mmray.data.decode.Preprocessor`, yielding ``data.decode_batch_size``-row batches. So every
task reads and decodes about 256 rows (the synth/prepare row-group size) with no object-store hop
between reading and decoding; blocks stream through the object store and nothing materialises the
split.

Each decode batch leaves its task as its own block (:func:`decode_block_bytes`): Ray Data otherwise
buffers a task's output up to ``target_max_block_size`` (128 MB) before handing any of it on, so with
large rows (224 px images, 10 s recordings) the first batch waited for a whole row group and the
consumer re-cut 160 MB blocks into training batches (benchmarks/RESULTS.md, "Ingest at realistic size").

Why not ``ray.data.read_parquet(files).map_batches(...)``: measured on 2 cores (benchmarks/RESULTS.md)
it ran at about half the speed. In Ray 2.60 it plans a ``ListFiles`` step (~1-2 s per epoch), packs
whole files into as few read tasks as there are CPUs (unbalanced: 741 vs 3,247 rows), and does not
fuse the decode into the read, so encoded bytes take an extra trip through the object store.

Training order follows ``data.shuffle`` (the in-process readers' :class:`~mmray.data.reader.Shuffle` means the
same): ``files`` and ``local`` put the row groups in a new seeded order every epoch (Ray's
``RandomSeedConfig(seed, reseed_after_execution=True)``: each execution of the dataset, i.e. each epoch, draws
from ``(seed, execution index)``), ``local`` adds the consumer's ``local_shuffle_buffer_size``
(:func:`local_shuffle_rows`), and ``global`` puts the read rows (still encoded) through ``random_shuffle``
before decoding.
"""
from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa
import ray

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.decode import DAMAGED, ROW_KEY, Preprocessor, model_row_bytes, row_keys
from mmray.data.reader import read_row_group, row_group_units, table_columns

# Emit each decode batch as one block (see the module docstring); False: Ray Data's default buffering.
BLOCK_PER_DECODE_BATCH = True
# At most one decode task per CPU of the cluster (see build_dataset); False: as many as data.decode_cpus fit.
CAP_DECODE_TASKS = True


def decode_block_bytes(data: DataConfig, info: DatasetInfo) -> int:
    """The ``target_max_block_size`` that makes each full decode batch one output block.

    Ray Data closes a block once its buffer exceeds this size and slices any block of 1.5x it or more, so
    it is the batch's size / 1.2: one batch always closes a block and is never sliced, even if the
    estimate (:func:`~mmray.data.decode.model_row_bytes`) is off by 15 % either way.
    """
    return max(1, int(data.decode_batch_size * model_row_bytes(data, info) / 1.2))


class _Read:
    """``map_batches`` UDF for ``shuffle: global``: the row groups named in its input, encoded, every one with the
    :data:`~mmray.data.decode.DAMAGED` column (null when whole) so all blocks share a schema for the shuffle."""

    def __init__(self, data: DataConfig, info: DatasetInfo):
        self.data, self.info = data, info

    def __call__(self, units: dict[str, Any]) -> Iterator[pa.Table]:
        for path, group in zip(units["path"], units["row_group"]):
            table = read_row_group(str(path), int(group), self.data, self.info)
            if DAMAGED not in table.column_names:
                table = table.append_column(DAMAGED, pa.nulls(table.num_rows, pa.string()))
            yield table


class _Decode:
    """``map_batches`` UDF for ``shuffle: global``: decodes shuffled rows."""

    def __init__(self, data: DataConfig, info: DatasetInfo, train: bool, seed: int):
        self.data, self.info, self.train, self.seed = data, info, train, seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return Preprocessor.shared(self.data, self.info, self.train, self.seed)(batch) | {ROW_KEY: row_keys(batch["id"])}


def epoch_seed(seed: int):
    """A seed Ray Data redraws from on every execution of a dataset (every epoch), the same for the same seed."""
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def order_units(ds: "ray.data.Dataset", shuffle: str, seed: int) -> "ray.data.Dataset":
    """``files``/``local``: the units (row groups, cache parts: one block each) in a new seeded order each epoch."""
    return ds.randomize_block_order(seed=epoch_seed(seed)) if shuffle in ("files", "local") else ds


def shuffle_rows(ds: "ray.data.Dataset", shuffle: str, seed: int) -> "ray.data.Dataset":
    """``global``: every row of the dataset in a new seeded order each epoch (Ray Data ``random_shuffle``)."""
    return ds.random_shuffle(seed=epoch_seed(seed)) if shuffle == "global" else ds


def local_shuffle_rows(data: DataConfig, batch_size: int, train: bool) -> int | None:
    """``local_shuffle_buffer_size`` for the consumer's ``iter_torch_batches`` (``local`` only; at least a batch)."""
    return max(data.shuffle_buffer_rows, batch_size) if train and data.shuffle == "local" else None


class _ReadDecode:
    """``map_batches`` UDF: reads the row groups named in its input batch and yields decoded batches."""

    def __init__(self, data: DataConfig, info: DatasetInfo, train: bool, seed: int):
        self.data, self.info, self.train, self.seed = data, info, train, seed

    def __call__(self, units: dict[str, Any]) -> Iterator[dict[str, Any]]:
        pre, step = Preprocessor.shared(self.data, self.info, self.train, self.seed), self.data.decode_batch_size
        for path, group in zip(units["path"], units["row_group"]):
            table = read_row_group(str(path), int(group), self.data, self.info)
            for start in range(0, table.num_rows, step):
                columns = table_columns(table.slice(start, step))
                yield pre(columns) | {ROW_KEY: row_keys(columns["id"])}


def build_dataset(data: DataConfig, info: DatasetInfo, split: str, *, train: bool, seed: int = 0) -> "ray.data.Dataset":
    """A lazy ``ray.data.Dataset`` of decoded rows of ``split``.

    Args:
        data: the job's ``data`` section; ``decode_batch_size`` rows are decoded per call.
        info: the dataset.
        split: ``"train"``, ``"val"`` or ``"test"``.
        train: augment images (with ``data.image.augment``) and order the rows by ``data.shuffle``.
        seed: seeds the order (redrawn every epoch) and the augmentation.

    Returns:
        A dataset whose rows follow the batch format of :mod:`mmray.data.decode` (no ``id``; its ``row_key``);
        iterate it with ``iter_torch_batches`` (or pass it to a TorchTrainer).

    Raises:
        UserError: unknown split, or a modality not in the dataset / no tokenizer (checked here on
            the driver, before any task runs).
    """
    Preprocessor(data, info, train=train, seed=seed)  # fail fast on the driver with a clear message
    units = [{"path": p, "row_group": g} for p, g in row_group_units(info, split)]
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    shuffle = data.shuffle if train else "none"
    if shuffle == "global":  # shuffle the encoded rows (several times smaller than decoded ones), then decode
        ds = ds.map_batches(_Read(data, info), batch_size=1, batch_format="pyarrow", num_cpus=data.decode_cpus)
        return shuffle_rows(ds, shuffle, seed).map_batches(
            _Decode(data, info, train, seed), batch_size=data.decode_batch_size, batch_format="numpy",
            num_cpus=data.decode_cpus)
    # batch_size=1: one row group per call, so tasks stay small and balanced however shards are sized.
    # At most one task per CPU: with data.decode_cpus 0.5, twice as many tasks would fit, and Ray keeps only
    # one idle worker process per CPU, so every epoch it killed the extra decode workers when they idled and
    # started (and imported torch in) new ones the next; and the twice-oversubscribed cores each held a row
    # group of large rows. Capped: 0.81-1.19x a DataLoader instead of 0.51x at 224 px / 10 s (benchmarks/RESULTS.md).
    ds = order_units(ds, shuffle, seed).map_batches(
        _ReadDecode(data, info, train, seed), batch_size=1, batch_format="numpy", num_cpus=data.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=_decode_tasks() if CAP_DECODE_TASKS else None))
    if BLOCK_PER_DECODE_BATCH:
        ds.context.target_max_block_size = decode_block_bytes(data, info)  # this dataset's context only
    return ds


def _decode_tasks() -> int | None:
    """The cluster's CPUs (at least 1), or None (no cap) when Ray is not started yet."""
    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def configure_data_context(
    cpu_limit: float | None = None, object_store_limit: int | None = None, *, fast_start: bool = False
) -> None:
    """Quiet and bounded Ray Data for the current process (driver or Train worker).

    Args:
        cpu_limit: CPUs Ray Data may use for its tasks (None = all free CPUs); leave some for training.
        object_store_limit: bytes of object store Ray Data may fill with blocks in flight (None = Ray's default).
        fast_start: drop Ray Data's ``ResourceBudget`` backpressure policy (keeping ``ConcurrencyCap``
            and ``DownstreamCapacity``). With it, each epoch runs a single decode task for its first
            ~1 s while the budget is shared with the not-yet-drained input operator. On a busy 2-core
            box dropping it gave ~1.5x; on a quiet one no gain (benchmarks/RESULTS.md), so it is off
            by default and Ray's own memory backpressure stays in charge.
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    if cpu_limit is not None or object_store_limit is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=cpu_limit, object_store_memory=object_store_limit)
    if fast_start:
        try:  # private module: if a Ray upgrade moves it, keep Ray's defaults rather than fail
            from ray.data._internal.execution import backpressure_policy as bp

            keep = [bp.ConcurrencyCapBackpressurePolicy, bp.DownstreamCapacityBackpressurePolicy]
            ctx.set_config(bp.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, keep)
        except (ImportError, AttributeError):
            pass

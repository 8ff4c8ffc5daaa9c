"""The Ray Data pipeline: Parquet shards -> decoded numpy batches, streamed (the only Ray file in mmray.data).

Shape of the pipeline: one tiny block per Parquet **row group** (``from_items`` of
``(path, row group)``), then a single ``map_batches`` that reads that row group and decodes it with
:class:`~mmray.data.decode.Preprocessor`, yielding ``data.decode_batch_size``-row batches. So every
task reads and decodes about 256 rows (the synth/prepare row-group size) with no object-store hop
between reading and decoding; blocks stream through the object store and nothing materialises the
split.

Why not ``ray.data.read_parquet(files).map_batches(...)``: measured on 2 cores (benchmarks/RESULTS.md)
it ran at about half the speed. In Ray 2.60 it plans a ``ListFiles`` step (~1-2 s per epoch), packs
whole files into as few read tasks as there are CPUs (unbalanced: 741 vs 3,247 rows), and does not
fuse the decode into the read, so encoded bytes take an extra trip through the object store.
"""
from __future__ import annotations

from typing import Any, Iterator

import ray

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.decode import ROW_KEY, Preprocessor, row_keys
from mmray.data.reader import read_row_group, row_group_units, table_columns

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
        train: augment images (with ``data.image.augment``) and randomise the row-group order.
        seed: seeds the row-group order and the augmentation.

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
    if train:
        ds = ds.randomize_block_order(seed=seed)
    # batch_size=1: one row group per call, so tasks stay small and balanced however shards are sized.
    return ds.map_batches(_ReadDecode(data, info, train, seed), batch_size=1, batch_format="numpy",
                          num_cpus=data.decode_cpus)


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

"""The Ray Data pipeline: Parquet shards -> decoded numpy batches, streamed (the only Ray file in mmray.data).

``read_parquet`` and the decode ``map_batches`` fuse into one task per block, so each shard is read
and decoded by one task with no object-store hop in between; blocks stream through the object store
and nothing materialises the split.
"""
from __future__ import annotations

import json
from typing import Any

import ray

from mmray.config.schema import DataConfig
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.decode import Preprocessor


# Ray reuses worker processes across tasks: build each Preprocessor (and its tokenizer) once per process.
_PREPROCESSORS: dict[str, Preprocessor] = {}


class _Decode:
    """A picklable function for ``map_batches``: decodes with the process's cached :class:`Preprocessor`."""

    def __init__(self, data: DataConfig, info: DatasetInfo, train: bool, seed: int):
        self.data, self.info, self.train, self.seed = data, info, train, seed
        self.key = json.dumps([data.model_dump(mode="json"), info.path, info.to_json(), train, seed], sort_keys=True)

    def decode(self, batch: dict[str, Any]) -> dict[str, Any]:
        pre = _PREPROCESSORS.get(self.key)
        if pre is None:
            if len(_PREPROCESSORS) >= 8:  # bounded: a long-lived worker may serve many jobs
                _PREPROCESSORS.clear()
            pre = _PREPROCESSORS[self.key] = Preprocessor(self.data, self.info, train=self.train, seed=self.seed)
        return pre(batch)


def build_dataset(data: DataConfig, info: DatasetInfo, split: str, *, train: bool, seed: int = 0) -> "ray.data.Dataset":
    """A lazy ``ray.data.Dataset`` of decoded batches of ``split``.

    Args:
        data: the job's ``data`` section; ``decode_batch_size`` rows are decoded per call.
        info: the dataset.
        split: ``"train"``, ``"val"`` or ``"test"``.
        train: augment images (with ``data.image.augment``) and randomise the block order.
        seed: seeds the block order and the augmentation.

    Returns:
        A dataset whose rows follow the batch format of :mod:`mmray.data.decode` (no ``id``);
        iterate it with ``iter_torch_batches``.

    Raises:
        UserError: unknown split, or a modality not in the dataset (checked here, before any task runs).
    """
    Preprocessor(data, info, train=train, seed=seed)  # fail fast on the driver: bad modality, missing tokenizer
    columns = ["id", *[t for t in info.tasks], *data.modalities]
    ds = ray.data.read_parquet(info.split_files(split), columns=columns, file_extensions=None)
    if train:
        ds = ds.randomize_block_order(seed=seed)
    return ds.map_batches(
        _Decode(data, info, train, seed).decode,
        batch_format="numpy",
        batch_size=data.decode_batch_size,
        zero_copy_batch=True,
    )


def configure_data_context(cpu_limit: float | None = None, object_store_limit: int | None = None) -> None:
    """Quiet and bounded Ray Data for the current process (driver or Train worker).

    Args:
        cpu_limit: CPUs Ray Data may use for its tasks (None = all free CPUs); leave some for training.
        object_store_limit: bytes of object store Ray Data may fill with blocks in flight (None = Ray's default).
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    if cpu_limit is not None or object_store_limit is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=cpu_limit, object_store_memory=object_store_limit)

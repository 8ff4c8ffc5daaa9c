"""Datasets: the dataset directory, synth, decoding, tokenisation, the local reader and the Ray Data pipeline.

Modules: ``dataset_dir`` (dataset.json + shard writer), ``synth`` (the built-in dataset),
``tokenizer`` (TextTokenizer), ``decode`` (Preprocessor: raw rows -> model batches), ``reader``
(in-process batches, no Ray), ``manifest`` and ``prepare`` (``mmray data prepare``: a user's
manifest -> a dataset directory), ``pipeline`` (Ray Data; the only module here that imports Ray),
``inspect`` (the ``mmray data inspect`` report).

``synth`` and ``prepare`` are reached through their modules (``mmray.data.synth.synth``): a package
name that is also a submodule's would be the function on one access and the module on the next.

Names are imported lazily so that ``import mmray.data`` stays cheap and never imports Ray.
"""
from __future__ import annotations

from mmray._lazy import lazy_exports

_EXPORTS = {
    "DatasetInfo": ".dataset_dir",
    "SplitInfo": ".dataset_dir",
    "ShardWriter": ".dataset_dir",
    "read_dataset_info": ".dataset_dir",
    "write_dataset_info": ".dataset_dir",
    "shard_schema": ".dataset_dir",
    "TextTokenizer": ".tokenizer",
    "Preprocessor": ".decode",
    "BadRecordError": ".decode",
    "decode_image": ".decode",
    "decode_audio": ".decode",
    "iter_batches": ".reader",
    "inspect_dataset": ".inspect",
    "build_dataset": ".pipeline",
    "configure_data_context": ".pipeline",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

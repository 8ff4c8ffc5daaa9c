"""The frozen-encoder embedding cache: each modality's encoder outputs computed once, trained from many times.

When every encoder of a job is frozen (``freeze: true``; for the whole run, or for the first epochs up to the
smallest ``unfreeze_after_epochs``, after which the run decodes the dataset and runs its encoders again)
and no augmentation changes a frozen encoder's inputs, an epoch's encoder outputs are the same every
epoch and in every trial of a sweep that only varies the fusion, heads and optimiser. The cache stores
them next to the dataset::

    DATASET/.cache/embeddings/<modality>-<encoder>-<key>/manifest.json
    DATASET/.cache/embeddings/<modality>-<encoder>-<key>/{train,val,test}/part-<file>-<row group>.parquet
    DATASET/.cache/embeddings/builds.jsonl        one line per build (what, when, how long)

One Parquet part per row group of the dataset, in the same rows and order, so modalities join by
position and cached training replays the raw reader's shuffle exactly (same seed, same batches).
Columns: ``id``, the label columns, ``<m>.valid``, ``<m>_present``, ``<m>.pooled`` (fixed-size list
of ``D`` float32) and, when the job's fusion reads sequences (``cross_attention``), ``<m>.sequence``
(``T*D`` float32) and ``<m>.sequence_mask`` (``T`` bool).

The key of an entry is a hash of: the dataset (``dataset.json`` and every shard's name, size and
mtime), the modality, the encoder's name and config (less ``freeze``/``unfreeze_after_epochs``/
``lr_mult``, which change no output), its weights files' contents (``resnet*.weights``, the ``hf_*``
model folder), what decides randomly initialised weights (``train.seed``, the torch version, the
configs of the encoders built before it), the modality's preprocessing (image size/mean/std, text
tokenizer and length, audio rate and length) and whether sequences are stored. Any change gives a
new entry; the manifest also records the sha256 of the encoder's actual weights, which the training
loop checks against the model it builds.

The build runs the encoders with Ray Data (``map_batches`` with an actor per CPU, or per GPU when the
cluster has GPUs); ``runner="local"`` runs the same code in-process (tests, no Ray). A file lock
makes concurrent builders (trials, sweeps) wait for the first one and reuse its result.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmray.config import JobConfig
from mmray.config.errors import RunError, UserError
from mmray.config.schema import DataConfig
from mmray.config.schema import embedding_cache_unusable as unusable_reason
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info
from mmray.data.decode import Preprocessor
from mmray.data.progress import BuildProgress
from mmray.data.reader import (
    Shuffle,
    _batches,
    read_row_group,
    row_group_units,
    shuffled_units,
    split_readers,
    table_columns,
)
from mmray.data.tokenizer import TextTokenizer
from mmray.hf_local import looks_local
from mmray.models.builder import build_as_trained, job_tasks
from mmray.models.fusion import FUSIONS
from mmray.models.hashing import weights_hash
from mmray.runtime import ensure_ray

CACHE_DIR = os.path.join(".cache", "embeddings")
MANIFEST = "manifest.json"
BUILDS_LOG = "builds.jsonl"
FORMAT = 2  # 2: test rows are cached too (the best epoch is measured on them)
SPLITS = ("train", "val", "test")
TRAINING_ONLY = {"freeze", "unfreeze_after_epochs", "lr_mult"}  # encoder keys that change no output
PREPROCESS = {"image": ("size", "mean", "std"), "text": ("tokenizer", "max_length"), "audio": ("sample_rate", "seconds")}


# ----------------------------------------------------------------------------------- may it be used
def cached_epochs(config) -> int:
    """How many leading epochs the cache can serve: while every encoder is frozen (all of ``train.epochs``
    when none ever unfreezes; up to the first ``unfreeze_after_epochs``; 0 when one trains from the start)."""
    epochs = config.train.epochs
    for m in config.data.modalities:
        enc = getattr(config.model.encoders, m)
        if not enc.freeze:
            return 0
        if enc.unfreeze_after_epochs is not None:
            epochs = min(epochs, enc.unfreeze_after_epochs)
    return epochs


def refuse_unless_usable(config) -> None:
    """Raises :class:`UserError` naming the key that forbids the cache (e.g. an unfrozen encoder)."""
    reason = unusable_reason(config)
    if reason is not None:
        raise UserError(f"embedding cache refused: {reason}")


def fusion_needs_sequences(name: str) -> bool:
    return bool(getattr(FUSIONS.entry(name).builder, "uses_sequences", False))


# ---------------------------------------------------------------------------------------------- keys
def digest(obj: Any) -> str:
    """sha256 of ``obj`` as sorted JSON: the hash of a cache key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and contents); memoised by mtime."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        parts = []
        for base, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                full = os.path.join(base, f)
                parts.append((os.path.relpath(full, path), file_fingerprint(full)))
        return digest(parts)
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def dataset_fingerprint(info: DatasetInfo) -> str:
    """``dataset.json`` plus every shard's name, size and mtime (and the dataset's tokenizer file)."""
    files = []
    for split in sorted(info.splits):
        for f in info.split_files(split):
            st = os.stat(f)
            files.append((split, os.path.basename(f), st.st_size, st.st_mtime_ns))
    tok = info.tokenizer_path
    return digest({"dataset": info.to_json(), "files": files,
                 "tokenizer": file_fingerprint(tok) if tok and os.path.exists(tok) else None})


def _local_fingerprint(ref: str | None) -> str | None:
    if ref is None:
        return None
    if looks_local(ref) and os.path.exists(os.path.expanduser(ref)):
        return file_fingerprint(ref)
    return f"name:{ref}"  # a hub name resolved from the local cache: the weights hash in the manifest still guards it


def key_parts(config, info: DatasetInfo, modality: str, *, sequences: bool, dataset_fp: str | None = None) -> dict:
    """Everything the cached outputs of ``modality`` depend on (see the module docstring)."""
    import torch

    enc = getattr(config.model.encoders, modality)
    pre = getattr(config.data, modality)
    preprocess = {k: getattr(pre, k) for k in PREPROCESS[modality]}
    if modality == "text":
        preprocess["tokenizer"] = _local_fingerprint(config.data.text.tokenizer)
    before = [m for m in config.data.modalities if m < modality]  # built first: they consume the seeded RNG
    return {
        "format": FORMAT,
        "dataset": dataset_fp or dataset_fingerprint(info),
        "modality": modality,
        "encoder": enc.model_dump(mode="json", exclude=TRAINING_ONLY),
        "weights_files": {k: _local_fingerprint(getattr(enc, k)) for k in type(enc)._path_fields()},
        "init": {"seed": config.train.seed, "torch": torch.__version__.split("+")[0],
                 "built_before": {m: getattr(config.model.encoders, m).model_dump(mode="json", exclude=TRAINING_ONLY)
                                  for m in before}},
        "preprocess": preprocess,
        "on_bad_record": config.data.on_bad_record,
        "sequences": sequences,
    }


def entry_name(config, modality: str, parts: dict) -> str:
    return f"{modality}-{getattr(config.model.encoders, modality).name}-{digest(parts)[:16]}"


# -------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class CacheEntry:
    """One modality's cached encoder outputs on disk."""

    path: str
    manifest: dict

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    @property
    def weights_hash(self) -> str:
        return self.manifest["weights_hash"]

    def parts(self, split: str) -> list[str]:
        return list(self.manifest["splits"][split]["parts"])

    def part_path(self, split: str, part: str) -> str:
        return os.path.join(self.path, split, part)


def read_manifest(path: str) -> dict | None:
    """The manifest of the cache entry folder ``path``, or None when it has none (not built, or being built)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_entry(path: str) -> CacheEntry | None:
    manifest = read_manifest(path)
    return None if manifest is None else CacheEntry(path, manifest)


def cache_root(info: DatasetInfo) -> str:
    return os.path.join(info.path, CACHE_DIR)


def find_entries(config, info: DatasetInfo, *, sequences: bool) -> tuple[dict[str, CacheEntry], list[str]]:
    """``(entries found, modalities missing)``. A job without sequences also accepts an entry that has them."""
    fp, found, missing = dataset_fingerprint(info), {}, []
    for m in config.data.modalities:
        for seq in ((True,) if sequences else (False, True)):
            entry = _read_entry(os.path.join(cache_root(info), entry_name(config, m, key_parts(
                config, info, m, sequences=seq, dataset_fp=fp))))
            if entry is not None:
                found[m] = entry
                break
        else:
            missing.append(m)
    return found, missing


@dataclass
class CachePlan:
    """Whether a job trains from cached embeddings, and why not when it does not."""

    used: bool
    reason: str
    entries: dict[str, CacheEntry] = field(default_factory=dict)
    epochs: int = 0  # the leading epochs it serves (cached_epochs); later ones read the dataset and run encoders
    partial: bool = False  # serves only the first ``epochs`` of the run (an encoder unfreezes after them)

    @property
    def weights(self) -> dict[str, str] | None:
        """modality -> the weights hash the cache was built with (None when the cache is not used)."""
        return {m: e.weights_hash for m, e in self.entries.items()} if self.used else None

    def line(self) -> str:
        """The run-log line."""
        if not self.used:
            return f"embedding cache: not used: {self.reason}"
        where = cache_root_of(self.entries)
        until = f"; epochs 1-{self.epochs}, then the encoders unfreeze" if self.partial else ""
        return f"embedding cache: used ({self.reason}; {', '.join(sorted(self.entries))}{until}) from {where}"


def plan(config, info: DatasetInfo, *, build: bool, sequences: bool | None = None, runner: str = "ray") -> CachePlan:
    """Decide whether ``config`` trains from the cache; with ``build``, build missing entries first.

    Args:
        sequences: store sequences too (default: whether the job's fusion reads them).
        runner: ``"ray"`` (Ray Data actors) or ``"local"`` (this process) for a build.
    """
    reason = unusable_reason(config)
    if reason is not None:
        return CachePlan(False, reason)
    seq = fusion_needs_sequences(config.model.fusion.name) if sequences is None else sequences
    entries, missing = find_entries(config, info, sequences=seq)
    epochs = cached_epochs(config)
    span = {"epochs": epochs, "partial": epochs < config.train.epochs}
    if not missing:
        return CachePlan(True, "reused", entries, **span)
    if not build:
        return CachePlan(False, f"no cache built for {', '.join(missing)} with this key (a sweep builds it before "
                                "its trials when no swept parameter changes encoders, preprocessing or train.seed)")
    try:
        seconds = build_entries(config, info, missing, sequences=seq, runner=runner)
    except OSError as e:  # e.g. a read-only dataset folder: train through the encoders instead
        return CachePlan(False, f"cannot write the cache under {cache_root(info)}: {e}")
    entries, missing = find_entries(config, info, sequences=seq)
    if missing:
        raise RuntimeError(f"embedding cache build left {missing} missing under {cache_root(info)}")
    return CachePlan(True, f"built in {seconds:.1f} s" if seconds else "reused", entries, **span)


# ---------------------------------------------------------------------------------------------- build
@contextlib.contextmanager
def locked(path: str):
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block: one builder at a time."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_job_encoders(config, info: DatasetInfo):
    """The job's model as the training loop builds it on rank 0 (:func:`~mmray.models.builder.build_as_trained`)."""
    tokenizer = TextTokenizer.for_job(config.data, info)
    return build_as_trained(config, job_tasks(info.tasks), tokenizer)


def build_entries(config, info: DatasetInfo, modalities: list[str], *, sequences: bool, runner: str = "ray") -> float:
    """Compute and write the entries of ``modalities``; returns the seconds spent (0 if another builder won).

    Holds a lock on the dataset's cache folder for the whole build: concurrent callers wait, then find
    the entries and build nothing.
    """
    root = cache_root(info)
    os.makedirs(root, exist_ok=True)
    with locked(os.path.join(root, ".lock")):
        _, still = find_entries(config, info, sequences=sequences)
        todo = [m for m in modalities if m in still]
        if not todo:
            return 0.0
        start = time.perf_counter()
        fp = dataset_fingerprint(info)
        model = build_job_encoders(config, info)
        parts = {m: key_parts(config, info, m, sequences=sequences, dataset_fp=fp) for m in todo}
        final = {m: os.path.join(root, entry_name(config, m, parts[m])) for m in todo}
        staging = {m: f"{final[m]}.tmp-{uuid.uuid4().hex[:8]}" for m in todo}
        units = [{"split": s, "path": p, "row_group": g, "part": part_name(info, s, p, g)}
                 for s in SPLITS if s in info.splits for p, g in row_group_units(info, s)]
        encoders = {m: model.encoders[m].eval() for m in todo}
        kwargs = dict(config_json=config.model_dump(mode="json"), info=info, encoders=encoders,
                      staging=staging, sequences=sequences)
        progress = BuildProgress(sum(info.split_rows(s) for s in SPLITS if s in info.splits), todo)
        try:
            if runner == "ray":
                _run_ray(units, kwargs, progress)
            else:
                fn = _EncodeUnits(**kwargs)
                for u in units:
                    progress.add(int(fn({k: np.array([v], dtype=object) for k, v in u.items()})["rows"].sum()))
            seconds = time.perf_counter() - start
            for m in todo:
                manifest = _manifest(config, info, m, parts[m], units, staging[m], encoders[m], seconds)
                manifest["weights_hash"] = weights_hash(encoders[m])
                with open(os.path.join(staging[m], MANIFEST), "w") as f:
                    json.dump(manifest, f, indent=1, sort_keys=True)
                os.replace(staging[m], final[m])
                log_build(root, {"entry": os.path.basename(final[m]), "modality": m, "seconds": round(seconds, 2)})
        finally:
            for path in staging.values():
                shutil.rmtree(path, ignore_errors=True)
        return seconds


def part_name(info: DatasetInfo, split: str, path: str, group: int, ext: str = "parquet") -> str:
    """The file of one row group in a cache: ``part-<shard number>-<row group>.<ext>``."""
    return f"part-{info.split_files(split).index(path):05d}-{int(group):04d}.{ext}"


def log_build(root: str, record: dict) -> None:
    """One line in ``root/builds.jsonl`` for a finished build (``record`` plus when and which process)."""
    with open(os.path.join(root, BUILDS_LOG), "a") as f:
        f.write(json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}) + "\n")


def _manifest(config, info, m, parts, units, staging, encoder, seconds) -> dict:
    splits = {}
    for s in (s for s in SPLITS if s in info.splits):
        names = [u["part"] for u in units if u["split"] == s]
        rows = sum(pq.ParquetFile(os.path.join(staging, s, n)).metadata.num_rows for n in names)
        splits[s] = {"parts": names, "rows": rows}
    size = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(staging) for f in fs)
    return {"modality": m, "encoder": getattr(config.model.encoders, m).name, "key": parts, "splits": splits,
            "bytes": size, "output_dim": int(encoder.output_dim), "sequences": parts["sequences"],
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(seconds, 2)}


def _run_ray(units: list[dict], kwargs: dict, progress: BuildProgress) -> None:
    """Batch inference with Ray Data: one actor per GPU (or per CPU), each encoding whole row groups."""
    import ray

    from mmray.data.pipeline import configure_data_context  # imports Ray Data: only when a cache is built

    ensure_ray()
    configure_data_context()
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    actors = gpus if gpus else max(1, min(int(res.get("CPU", 1)), len(units)))
    # The encoders go through the object store once, by reference (a ref in a list is not resolved by Ray).
    kwargs = {**kwargs, "encoders": [ray.put(kwargs["encoders"])], "threads": None if gpus else 1}
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(_EncodeUnits, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0,
                        # Ray Data's default (restart forever) and its constructor arguments in the object store
                        # make Ray print an error-level line per actor; a lost encoder actor fails the build
                        # instead, and the next run builds the cache again.
                        max_restarts=0)
    for done in ds.iter_batches(batch_size=None, batch_format="numpy"):  # each: the rows of the parts written
        progress.add(int(done["rows"].sum()))


class _EncodeUnits:
    """Reads row groups, decodes them (no augmentation), runs the frozen encoders, writes one part per row group."""

    def __init__(self, config_json: dict, info: DatasetInfo, encoders: dict, staging: dict[str, str], sequences: bool,
                 threads: int | None = None):
        import torch

        if isinstance(encoders, list):  # [ObjectRef] from the Ray runner
            import ray

            encoders = ray.get(encoders[0])
        config = JobConfig.model_validate(config_json)
        self.data = config.data.model_copy(update={"modalities": tuple(sorted(encoders))})
        self.info, self.staging, self.sequences = info, staging, sequences
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)  # one actor per CPU: more threads would fight over the cores
        self.encoders = {m: e.to(self.device).eval() for m, e in encoders.items()}
        from mmray.train.device import channels_last_encoders, to_channels_last  # the loop's rule; data/ sits below it

        to_channels_last(self.encoders, channels_last_encoders(config, self.encoders))  # as training runs them
        self.pre = Preprocessor(self.data, info, train=False)

    def __call__(self, units: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for split, path, group, part in zip(units["split"], units["path"], units["row_group"], units["part"]):
            table = read_row_group(str(path), int(group), self.data, self.info)
            outs = [self._encode(table.slice(s, self.data.decode_batch_size))
                    for s in range(0, table.num_rows, self.data.decode_batch_size)]
            batch = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}
            for m in self.encoders:
                os.makedirs(os.path.join(self.staging[m], str(split)), exist_ok=True)
                pq.write_table(_to_table(batch, m, table.column("id")),
                               os.path.join(self.staging[m], str(split), str(part)), write_page_checksum=True)
            rows.append(table.num_rows)
        return {"rows": np.asarray(rows)}

    def _encode(self, table: pa.Table) -> dict[str, np.ndarray]:
        import torch

        decoded = self.pre(table_columns(table))
        out = {k: v for k, v in decoded.items() if k == "valid" or k.startswith("label") or k.endswith("_present")}
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in decoded.items()}
        with torch.inference_mode():
            for m, enc in self.encoders.items():
                e = enc(batch)
                out[f"{m}.pooled"] = e.pooled.float().cpu().numpy()
                if self.sequences and e.sequence is not None:
                    out[f"{m}.sequence"] = e.sequence.float().cpu().numpy()
                    out[f"{m}.sequence_mask"] = e.sequence_mask.cpu().numpy()
        return out


def _fixed_list(x: np.ndarray) -> pa.Array:
    n = x.shape[0]
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), int(x.size // max(n, 1)) if n else 1)


def _to_table(batch: dict[str, np.ndarray], m: str, ids: pa.ChunkedArray) -> pa.Table:
    cols: dict[str, Any] = {"id": ids}
    cols |= {k: batch[k] for k in sorted(batch) if k.startswith("label")}
    cols[f"{m}.valid"] = batch["valid"]
    cols[f"{m}_present"] = batch[f"{m}_present"]
    cols[f"{m}.pooled"] = _fixed_list(batch[f"{m}.pooled"])
    if f"{m}.sequence" in batch:
        cols[f"{m}.sequence"] = _fixed_list(batch[f"{m}.sequence"])
        cols[f"{m}.sequence_mask"] = _fixed_list(batch[f"{m}.sequence_mask"])
    return pa.table(cols)


# --------------------------------------------------------------------------------------------- reading
def read_part(entries: dict[str, CacheEntry], split: str, part: str) -> pa.Table:
    """The part ``part`` of every entry side by side (rows align: same row group, same order)."""
    table = None
    for m in sorted(entries):
        path = entries[m].part_path(split, part)
        try:
            t = pq.read_table(path, page_checksum_verification=True)
        except (OSError, pa.ArrowException) as e:
            raise RunError(f"embedding cache part {path} is damaged ({str(e).splitlines()[0]}); delete "
                           f"{entries[m].path} and run again: it is rebuilt from the dataset") from None
        if table is None:
            table = t
            continue
        if t.num_rows != table.num_rows:
            raise RuntimeError(f"embedding cache parts {part} of {split} disagree in rows; delete {cache_root_of(entries)}")
        for name in t.column_names:
            if name != "id" and not name.startswith("label"):
                table = table.append_column(name, t.column(name))
    return table


def part_units(names: list[str]) -> list[tuple[str, int]]:
    """Part files (:func:`part_name`) -> ``(shard number, row group)`` units, which
    :func:`~mmray.data.reader.shuffled_units` orders as the shard reader orders its row groups."""
    return [(n.split("-")[1], int(n.split("-")[2].split(".")[0])) for n in names]


def cache_root_of(entries: dict[str, CacheEntry]) -> str:
    return os.path.dirname(next(iter(entries.values())).path)


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    return np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]) if col.num_chunks else np.zeros(0)


def table_batch(table: pa.Table, entries: dict[str, CacheEntry]) -> dict[str, np.ndarray]:
    """A joined cache table -> the model batch: labels, ``valid``, ``<m>_present``, ``<m>.pooled`` [, sequences]."""
    n = table.num_rows
    out: dict[str, np.ndarray] = {}
    valid = np.ones(n, dtype=bool)
    for name in table.column_names:
        if name.startswith("label"):
            out[name] = table.column(name).to_numpy().astype(np.int64)
    for m, e in sorted(entries.items()):
        d = e.manifest["output_dim"]
        valid &= table.column(f"{m}.valid").to_numpy(zero_copy_only=False).astype(bool)
        out[f"{m}_present"] = table.column(f"{m}_present").to_numpy(zero_copy_only=False).astype(bool)
        out[f"{m}.pooled"] = _flat(table.column(f"{m}.pooled")).astype(np.float32).reshape(n, d)
        if f"{m}.sequence" in table.column_names:
            mask = _flat(table.column(f"{m}.sequence_mask")).astype(bool).reshape(n, -1)
            out[f"{m}.sequence"] = _flat(table.column(f"{m}.sequence")).astype(np.float32).reshape(n, mask.shape[1], d)
            out[f"{m}.sequence_mask"] = mask
    out["valid"] = valid
    return out


def iter_cached_batches(entries: dict[str, CacheEntry], info: DatasetInfo, split: str, *, batch_size: int, train: bool,
                        seed: int = 0, epoch: int = 0, order: Shuffle | None = None) -> Iterator[dict]:
    """Like :func:`mmray.data.reader.iter_batches` (same order for the same seed and epoch), from the cache.
    ``order``: the job's ``data.shuffle`` (:meth:`Shuffle.for_data`); None = the schema's default."""
    import torch

    rng = np.random.default_rng([seed, epoch])
    rng.integers(2**31)  # the raw reader draws its augmentation seed here: keep the streams in step
    first = next(iter(entries.values()))
    names = first.parts(split)
    units = part_units(names)
    by_unit = dict(zip(units, names))
    order = order or Shuffle.default(batch_size, train)
    if order.units:
        units = shuffled_units(units, rng)
    chunks = (read_part(entries, split, by_unit[u]) for u in units)
    for table in _batches(chunks, batch_size, order.window, rng if order.mix else None):
        yield {k: torch.from_numpy(v) for k, v in table_batch(table, entries).items()}


def cached_readers(config, cache: CachePlan, raw=None):
    """``(train_batches, val_batches)``: ``epoch -> batches``, as :func:`mmray.data.reader.split_readers`, read from
    the cache for the epochs it serves (``cache.epochs``) and from ``raw`` (default: the dataset's shards) after them."""
    info = read_dataset_info(config.data.path)
    bs, seed = config.train.batch_size, config.train.seed

    def reader(split: str, train: bool, raw):
        def batches(epoch: int):
            if cache.partial and epoch > cache.epochs:
                return raw(epoch)
            return iter_cached_batches(cache.entries, info, split, batch_size=bs, train=train, seed=seed, epoch=epoch,
                                       order=Shuffle.for_data(config.data, bs, train))
        return batches

    raw_train, raw_val = raw or split_readers(config)
    return reader("train", True, raw_train), reader("val", False, raw_val)


def build_cached_dataset(entries: dict[str, CacheEntry], split: str, *, train: bool, seed: int = 0,
                         shuffle: str | None = None):
    """A lazy ``ray.data.Dataset`` of cached batches of ``split`` (for TorchTrainer workers), ordered by
    ``shuffle`` (the job's ``data.shuffle``; None = the schema's default) when training."""
    import ray

    from mmray.data.pipeline import order_units, shuffle_rows  # imports Ray Data: only when a run builds it

    shuffle = (shuffle or DataConfig.model_fields["shuffle"].default) if train else "none"
    parts = [{"part": p} for p in next(iter(entries.values())).parts(split)]
    ds = ray.data.from_items(parts, override_num_blocks=max(1, len(parts)))
    ds = order_units(ds, shuffle, seed).map_batches(_ReadCached(entries, split), batch_size=1, batch_format="numpy",
                                                    num_cpus=0.25)
    return shuffle_rows(ds, shuffle, seed)


class _ReadCached:
    def __init__(self, entries: dict[str, CacheEntry], split: str):
        self.entries, self.split = entries, split

    def __call__(self, units: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for part in units["part"]:
            yield table_batch(read_part(self.entries, self.split, str(part)), self.entries)


# --------------------------------------------------------------------------------------------- listing
def list_caches(path: str) -> list[dict]:
    """The cache entries of the dataset at ``path``: name, modality, encoder, rows, bytes, built, stale."""
    info = read_dataset_info(path)

    def describe(m: dict, other_data: bool) -> dict:
        return {"modality": m["modality"], "encoder": m["encoder"], "bytes": m["bytes"],
                "rows": {s: v["rows"] for s, v in m["splits"].items()}, "sequences": m["sequences"],
                "built": m["built"], "stale": other_data}
    return list_entries(cache_root(info), info, describe)


def list_entries(root: str, info: DatasetInfo, describe: Callable[[dict, bool], dict]) -> list[dict]:
    """``{"name": folder, **describe(manifest, built for another version of the dataset)}`` for every entry
    folder under ``root`` that has a manifest, by name (one listing for the embedding and decoded-input caches)."""
    if not os.path.isdir(root):
        return []
    fp = dataset_fingerprint(info)
    out = []
    for name in sorted(os.listdir(root)):
        manifest = read_manifest(os.path.join(root, name))
        if manifest is not None:
            out.append({"name": name, **describe(manifest, manifest["key"]["dataset"] != fp)})
    return out


# ---------------------------------------------------------------------------------------------- sweeps
SHARING_BREAKERS = ("model.encoders.", "data.", "train.seed", "train.embedding_cache")


def shared_plan(config, info: DatasetInfo, swept: dict[str, list]) -> CachePlan:
    """Build the cache every trial of a sweep reads, before any trial starts.

    Args:
        config: the sweep's base job.
        swept: swept dotted key -> the values it may take (``model.fusion.name``'s decide whether sequences
            are stored: if any choice reads them, the shared cache holds them).

    A swept key that changes the encoders' outputs (an encoder's config, preprocessing, ``train.seed``)
    means each trial would need its own cache: none is built and trials run their encoders.
    """
    reason = unusable_reason(config)
    if reason is not None:
        return CachePlan(False, reason)
    breaking = sorted(k for k in swept if k.startswith(SHARING_BREAKERS))
    if breaking:
        return CachePlan(False, f"parameters.{breaking[0]} is swept: it changes the encoders' outputs from trial to "
                                "trial, so trials run their encoders")
    fusions = list(swept.get("model.fusion.name") or []) + [config.model.fusion.name]
    return plan(config, info, build=True, sequences=any(fusion_needs_sequences(f) for f in fusions))

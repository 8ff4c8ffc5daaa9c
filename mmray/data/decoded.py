"""The decoded-input cache (``data.decode_cache``): each row decoded once, trained from in every epoch of every trial.

Decoding (PNG/JPEG to pixels, WAV/FLAC to a resampled waveform, text to token ids) is the same in every epoch and
in every trial of a sweep that varies the model and the optimiser; only augmentation differs. The cache stores each
row as :meth:`~mmray.data.decode.Preprocessor.decode` gives it, before augmentation, next to the dataset::

    DATASET/.cache/decoded/<modalities>-<key>/manifest.json
    DATASET/.cache/decoded/<modalities>-<key>/{train,val,test}/part-<file>-<row group>.arrow
    DATASET/.cache/decoded/builds.jsonl        one line per build (what, when, how long)

One uncompressed Arrow IPC file per row group of the dataset, in the same rows and order, read memory-mapped (the
operating system pages it in; a reader holds one shuffle window of row references and copies one batch at a time,
never a split). Readers replay the shard reader's order (:func:`~mmray.data.reader.batch_rows`), and
:meth:`~mmray.data.decode.Preprocessor.finish` augments with the same seeded draws, so a run gives the same batches,
hence the same metrics, with the cache as without. Columns: ``id``, the label columns, ``valid``, and per modality
``image`` (uint8 ``S*S*3``, HWC, at ``data.image.size``), ``input_ids`` (int32 ``L``) and ``attention_mask``
(int8 ``L``), ``audio`` (float32 ``N``: mono at ``data.audio.sample_rate``, cropped or padded to
``data.audio.seconds``), and ``<m>_present``. A row that fails to decode is stored as zeros with ``valid`` False: it
is counted in the build's ``bad_records`` and, as without the cache, in each epoch's ``train.bad_records`` and
weighs nothing in any loss or metric.

The key of an entry is a hash of: the format version, the dataset (``dataset.json``, every shard's name, size and
mtime, the dataset's tokenizer file), the modalities, what decides each stored array (``data.image.size`` and the
Pillow version; the tokenizer's own content and ``data.text.max_length``; ``data.audio.sample_rate``/``seconds``
and the torchaudio version) and ``data.on_bad_record``. Normalisation (``mean``/``std``) and augmentation run after
the cache and are not in the key. Any change gives a new entry; an entry of an older key is never read (``mmray data
inspect`` marks it stale). A file lock makes concurrent builders (trials, sweeps, runs) wait for the first one.

Size: decoded inputs are far larger than encoded files. A 224 px image is 147 KiB of pixels (a JPEG of it, 10-30
KiB); 10 s of 16 kHz audio is 625 KiB of float32 (its FLAC, about 150-300 KiB). ``auto`` estimates the entry as rows
x bytes per row (from the job's sizes: ``S*S*3 + 5*L + 4*N`` plus ids and labels) and builds it only when that fits
:data:`BUDGET_BYTES` and half the free disk under the dataset; ``on`` builds it whatever its size.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from mmray.config.errors import RunError
from mmray.config.schema import DataConfig
from mmray.data.cache import (
    BuildProgress,
    dataset_fingerprint,
    digest,
    list_entries,
    locked,
    log_build,
    part_name,
    part_units,
    read_manifest,
)
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info
from mmray.data.decode import BadRecordError, Preprocessor
from mmray.data.reader import (
    Held,
    Shuffle,
    batch_rows,
    iter_batches,
    read_row_group,
    row_group_units,
    shuffled_units,
    split_readers,
    table_columns,
)
from mmray.data.tokenizer import TextTokenizer
from mmray.runtime import ensure_ray
from mmray.storage import human_size

CACHE_DIR = os.path.join(".cache", "decoded")
MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "val", "test")
BUDGET_BYTES = 16 * 2**30  # auto: at most this much disk ...
DISK_SHARE = 0.5  # ... and at most this share of the free disk under the dataset
# swept keys that change the stored arrays: a sweep over them cannot share one entry
SHARING_BREAKERS = ("data.path", "data.modalities", "data.on_bad_record", "data.image.size", "data.text.",
                    "data.audio.")
FIXED = {"image": np.uint8, "input_ids": np.int32, "attention_mask": np.int8, "audio": np.float32}
MODEL_DTYPES = {"input_ids": np.int64, "attention_mask": np.int64}  # what the model batch holds (decode.py)


# ---------------------------------------------------------------------------------------------- keys
def key_parts(config, info: DatasetInfo, *, dataset_fp: str | None = None, tokenizer=None) -> dict:
    """Everything the stored arrays depend on (see the module docstring). ``tokenizer``: the one the reader uses
    (an export's own), when not the job's."""
    data = config.data
    parts: dict[str, Any] = {"format": FORMAT, "dataset": dataset_fp or dataset_fingerprint(info),
                             "modalities": list(data.modalities), "on_bad_record": data.on_bad_record}
    if "image" in data.modalities:
        import PIL

        parts["image"] = {"size": data.image.size, "pillow": PIL.__version__}
    if "text" in data.modalities:
        parts["text"] = {"tokenizer": (tokenizer or TextTokenizer.load(data.text, info)).fingerprint(),
                         "max_length": data.text.max_length}
    if "audio" in data.modalities:
        import torchaudio

        parts["audio"] = {"sample_rate": data.audio.sample_rate, "seconds": data.audio.seconds,
                          "torchaudio": torchaudio.__version__.split("+")[0]}
    return parts


def entry_name(config, parts: dict) -> str:
    return f"{'+'.join(config.data.modalities)}-{digest(parts)[:16]}"


def cache_root(info: DatasetInfo) -> str:
    return os.path.join(info.path, CACHE_DIR)


@dataclass(frozen=True)
class DecodedEntry:
    """One job's decoded inputs on disk."""

    path: str
    manifest: dict

    def parts(self, split: str) -> list[str]:
        return list(self.manifest["splits"][split]["parts"])

    def part_path(self, split: str, part: str) -> str:
        return os.path.join(self.path, split, part)

    def has(self, split: str) -> bool:
        return split in self.manifest["splits"]


def find_entry(config, info: DatasetInfo, parts: dict | None = None) -> DecodedEntry | None:
    """The entry of this job's key, or None. Only the current key's folder is looked at: a stale one is never read."""
    path = os.path.join(cache_root(info), entry_name(config, parts or key_parts(config, info)))
    manifest = read_manifest(path)
    return None if manifest is None else DecodedEntry(path, manifest)


# ---------------------------------------------------------------------------------------------- size
def row_bytes(data) -> int:
    """Bytes one row takes in the cache: the decoded arrays, plus about 64 for the id, labels and flags."""
    size = 64
    if "image" in data.modalities:
        size += data.image.size ** 2 * 3
    if "text" in data.modalities:
        size += data.text.max_length * 5
    if "audio" in data.modalities:
        size += data.audio.num_samples * 4
    return size


def estimated_bytes(config, info: DatasetInfo) -> int:
    return row_bytes(config.data) * sum(info.split_rows(s) for s in SPLITS if s in info.splits)


def budget_bytes(info: DatasetInfo) -> int:
    """What ``auto`` may use: :data:`BUDGET_BYTES`, or less when half the free disk under the dataset is less."""
    try:
        free = shutil.disk_usage(info.path).free
    except OSError:
        free = 0
    return int(min(BUDGET_BYTES, DISK_SHARE * free))


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class DecodePlan:
    """Whether a run reads its inputs from the decoded-input cache (``entry``), and why not when it does not."""

    used: bool
    reason: str
    entry: DecodedEntry | None = None

    def line(self) -> str:
        """The run-log line."""
        if not self.used:
            return f"decoded-input cache: not used: {self.reason}"
        m = self.entry.manifest
        rows = sum(s["rows"] for s in m["splits"].values())
        bad = sum(s.get("bad_records", 0) for s in m["splits"].values())
        bad_note = f", {bad} bad records" if bad else ""
        return (f"decoded-input cache: used ({self.reason}; {rows:,} rows, {human_size(m['bytes'])}{bad_note}) "
                f"from {os.path.dirname(self.entry.path)}")


def unusable_reason(config, info: DatasetInfo, embedding=None) -> str | None:
    """Why ``config`` does not read decoded inputs from the cache, or None when it may.

    ``embedding``: the run's :class:`~mmray.data.cache.CachePlan`; one that serves every epoch leaves nothing to decode.
    """
    setting = config.data.decode_cache
    if setting == "off":
        return "data.decode_cache is off"
    if embedding is not None and embedding.used and not embedding.partial:
        return "the embedding cache serves every epoch (nothing is decoded)"
    if "://" in config.data.path:
        return f"data.path {config.data.path} is not on a local disk (the cache lives next to the dataset)"
    return None


def over_budget(config, info: DatasetInfo) -> str | None:
    """With ``auto``: why the entry is too big to build, or None when it fits (``on`` builds whatever the size).
    Only a build is gated: an entry already built is read even when the disk has filled up since."""
    if config.data.decode_cache != "auto":
        return None
    need, room = estimated_bytes(config, info), budget_bytes(info)
    if need <= room:
        return None
    return (f"the decoded inputs would take about {human_size(need)} ({human_size(row_bytes(config.data))} a row: "
            f"decoded pixels and waveforms are far larger than their files), over the auto budget of "
            f"{human_size(room)} (the smaller of {human_size(BUDGET_BYTES)} and half the free disk); "
            "set data.decode_cache: on to build it anyway, or lower data.image.size / data.audio.seconds")


def plan(config, info: DatasetInfo, *, build: bool, runner: str = "ray", embedding=None) -> DecodePlan:
    """Decide whether ``config`` reads the cache; with ``build``, build it first when missing.

    Args:
        runner: ``"ray"`` (Ray Data tasks over the row groups) or ``"local"`` (this process) for a build.
        embedding: the run's embedding-cache plan (see :func:`unusable_reason`).

    Raises:
        BadRecordError: with ``data.on_bad_record: fail``, the build met a record it cannot decode.
    """
    reason = unusable_reason(config, info, embedding)
    if reason is not None:
        return DecodePlan(False, reason)
    parts = key_parts(config, info)
    entry = find_entry(config, info, parts)
    if entry is not None:
        return DecodePlan(True, "reused", entry)
    if not build:
        return DecodePlan(False, "none built with this key (a run or a sweep builds it before training, unless a "
                                 "swept parameter changes the decoded arrays)")
    too_big = over_budget(config, info)
    if too_big is not None:
        return DecodePlan(False, too_big)
    try:
        seconds = build_entry(config, info, parts, runner=runner)
    except OSError as e:  # e.g. a read-only dataset folder or a full disk: decode every epoch instead
        return DecodePlan(False, f"cannot write the cache under {cache_root(info)}: {e}")
    entry = find_entry(config, info, parts)
    if entry is None:
        raise RuntimeError(f"decoded-input cache build left nothing under {cache_root(info)}")
    return DecodePlan(True, f"built in {seconds:.1f} s" if seconds else "reused", entry)


def shared_plan(config, info: DatasetInfo, swept: dict[str, list], embedding=None, runner: str = "ray") -> DecodePlan:
    """Build the entry every trial of a sweep reads, before any trial starts (``swept``: dotted key -> values).
    A swept key that changes the stored arrays (image size, text, audio, modalities) means no shared entry."""
    reason = unusable_reason(config, info, embedding)
    if reason is not None:
        return DecodePlan(False, reason)
    breaking = sorted(k for k in swept if k.startswith(SHARING_BREAKERS))
    if breaking:
        return DecodePlan(False, f"parameters.{breaking[0]} is swept: it changes the decoded arrays from trial to "
                                 "trial, so trials decode")
    return plan(config, info, build=True, embedding=embedding, runner=runner)


# ---------------------------------------------------------------------------------------------- build
def build_entry(config, info: DatasetInfo, parts: dict, *, runner: str = "ray") -> float:
    """Decode every split once and write the entry; returns the seconds spent (0 if another builder won).

    Holds a lock on the dataset's cache folder for the whole build: concurrent callers wait, then find the entry.
    """
    root = cache_root(info)
    os.makedirs(root, exist_ok=True)
    with locked(os.path.join(root, ".lock")):
        if find_entry(config, info, parts) is not None:
            return 0.0
        start = time.perf_counter()
        final = os.path.join(root, entry_name(config, parts))
        staging = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        splits = [s for s in SPLITS if s in info.splits]
        units = [{"split": s, "path": p, "row_group": g, "part": part_name(info, s, p, g, ext="arrow")}
                 for s in splits for p, g in row_group_units(info, s)]
        kwargs = dict(data_json=config.data.model_dump(mode="json"), info=info, staging=staging)
        progress = BuildProgress(sum(info.split_rows(s) for s in splits), config.data.modalities,
                                 what="decoded-input cache", verb="decoded")
        done: dict[str, list[int]] = {}  # part -> [rows, bad rows]
        try:
            if runner == "ray":
                _run_ray(units, kwargs, progress, done)
            else:
                fn = _DecodeUnits(**kwargs)
                for u in units:
                    _collect(fn({k: np.array([v], dtype=object) for k, v in u.items()}), progress, done)
            seconds = time.perf_counter() - start
            size = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(staging) for f in fs)
            manifest = {"key": parts, "modalities": list(config.data.modalities), "bytes": size,
                        "row_bytes": row_bytes(config.data), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "build_seconds": round(seconds, 2), "splits": {}}
            for s in splits:
                names = [u["part"] for u in units if u["split"] == s]
                manifest["splits"][s] = {"parts": names, "rows": sum(done[f"{s}/{n}"][0] for n in names),
                                         "bad_records": sum(done[f"{s}/{n}"][1] for n in names)}
            os.makedirs(staging, exist_ok=True)
            with open(os.path.join(staging, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            os.replace(staging, final)
            log_build(root, {"entry": os.path.basename(final), "seconds": round(seconds, 2),
                             "bad_records": sum(v["bad_records"] for v in manifest["splits"].values())})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return seconds


def _collect(out: dict[str, np.ndarray], progress: BuildProgress, done: dict[str, list[int]]) -> None:
    for failed in out["error"]:
        if failed:  # raised here, as itself: through Ray Data it would arrive as Ray's UserCodeException
            raise BadRecordError(*json.loads(str(failed)))
    for key, rows, bad in zip(out["part"], out["rows"], out["bad"]):
        done[str(key)] = [int(rows), int(bad)]
    progress.add(int(np.sum(out["rows"])))


def _run_ray(units: list[dict], kwargs: dict, progress: BuildProgress, done: dict) -> None:
    """Decode with Ray Data: one task per row group (a CPU each), decoding and writing it.

    Tasks, not an actor pool: the decoder is cheap to build (a tokenizer file at most) next to a row group's
    images and audio, and a pool's actors each printed Ray's error-level line about restartable actors with
    constructor arguments in the object store (Ray Data always puts them there), and a pool ending while one
    actor was still starting printed a failed kill from Ray's GCS."""
    import ray

    from mmray.data.pipeline import configure_data_context  # imports Ray Data: only when the cache is built

    ensure_ray()
    configure_data_context()
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(_decode_units, fn_kwargs=kwargs, batch_size=1, batch_format="numpy", num_cpus=1)
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        _collect(out, progress, done)


def _decode_units(units: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    return _DecodeUnits(**kwargs)(units)


class _DecodeUnits:
    """Reads row groups, decodes them without augmentation, writes one Arrow file per row group."""

    def __init__(self, data_json: dict, info: DatasetInfo, staging: str):
        self.data, self.info, self.staging = DataConfig.model_validate(data_json), info, staging
        self.pre = Preprocessor(self.data, info, train=False)

    def __call__(self, units: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._decode(units)
        except BadRecordError as e:  # on_bad_record: fail; the builder raises it (see _collect)
            failed = json.dumps([e.record_id, e.column, e.reason])
            return {"part": np.asarray([""], dtype=object), "rows": np.zeros(1, dtype=np.int64),
                    "bad": np.zeros(1, dtype=np.int64), "error": np.asarray([failed], dtype=object)}

    def _decode(self, units: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys, rows, bad = [], [], []
        for split, path, group, part in zip(units["split"], units["path"], units["row_group"], units["part"]):
            table = read_row_group(str(path), int(group), self.data, self.info)
            step = self.data.decode_batch_size
            outs = [self.pre.decode(table_columns(table.slice(s, step))) for s in range(0, table.num_rows, step)]
            batch = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}
            os.makedirs(os.path.join(self.staging, str(split)), exist_ok=True)
            write_part(os.path.join(self.staging, str(split), str(part)), batch, table.column("id"))
            keys.append(f"{split}/{part}")
            rows.append(table.num_rows)
            bad.append(int((~batch["valid"]).sum()) if outs else 0)
        return {"part": np.asarray(keys, dtype=object), "rows": np.asarray(rows), "bad": np.asarray(bad),
                "error": np.asarray([""] * len(keys), dtype=object)}


def write_part(path: str, batch: dict[str, np.ndarray], ids: pa.ChunkedArray) -> None:
    """One row group's decoded arrays as an uncompressed Arrow IPC file (memory-mappable as written)."""
    cols: dict[str, Any] = {"id": ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids}
    for key in sorted(batch):
        x = batch[key]
        if key in FIXED:
            flat = np.ascontiguousarray(x.astype(FIXED[key], copy=False)).reshape(-1)
            cols[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat), int(np.prod(x.shape[1:])))
        else:
            cols[key] = pa.array(x)
    table = pa.table(cols)
    tmp = f"{path}.tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- reading
def _open_part(path: str) -> pa.Table:
    """A part file as a memory-mapped table. Raises :class:`RunError` naming a damaged part and the entry to delete."""
    try:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()
    except (OSError, pa.ArrowException) as e:
        entry = os.path.dirname(os.path.dirname(path))
        raise RunError(f"decoded-input cache part {path} is damaged ({str(e).splitlines()[0]}); delete {entry} "
                       "and run again: it is rebuilt from the dataset") from None


def read_part(path: str, data, *, ids: bool = False) -> tuple[int, dict[str, np.ndarray]]:
    """A part file -> ``(rows, the decoded arrays of`` :meth:`~mmray.data.decode.Preprocessor.decode` ``)``, as
    memory-mapped views: nothing is copied until a batch gathers its rows. ``ids``: also ``"id"``, the row ids.

    Raises:
        RunError: the file is missing, truncated or not an Arrow file, naming it and the entry to delete.
    """
    table = _open_part(path)
    n = table.num_rows
    shapes = {"image": (data.image.size, data.image.size, 3), "input_ids": (data.text.max_length,),
              "attention_mask": (data.text.max_length,), "audio": (data.audio.num_samples,)}
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        if name == "id":
            if ids:
                out["id"] = table.column("id").to_numpy(zero_copy_only=False)
            continue
        chunks = table.column(name)  # one chunk as written: a view of the file (combining would copy it)
        col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
        if name in FIXED:
            out[name] = col.flatten().to_numpy(zero_copy_only=True).reshape((n,) + shapes[name])
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return n, out


def rows_of(arrays: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of a :func:`read_part` result, copied out of the file in the model's dtypes."""
    return {k: v[start:stop].astype(MODEL_DTYPES.get(k, v.dtype)) for k, v in arrays.items()}


def _gather(held: Held, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``ids`` (reader row numbers) of the held parts, as one batch in the model's dtypes. A held part is
    ``(arrays, index)``: its reader rows are ``arrays``' rows ``index`` (None: all of them, in order)."""
    numbers, local = held.locate(ids)
    first = held.chunks[int(numbers[0])][0]
    out = {k: np.empty((len(ids),) + v.shape[1:], dtype=MODEL_DTYPES.get(k, v.dtype)) for k, v in first.items()}
    for k in np.unique(numbers):
        rows = numbers == k
        part, index = held.chunks[int(k)]
        at = local[rows] if index is None else index[local[rows]]
        for name, x in out.items():
            x[rows] = part[name][at]
    return out


def iter_decoded_batches(entry: DecodedEntry, data, info: DatasetInfo, split: str | Sequence[str], *, batch_size: int,
                         train: bool, seed: int = 0, epoch: int = 0, tokenizer=None,
                         rows: Mapping[str, np.ndarray] | None = None, with_ids: bool = False) -> Iterator[dict]:
    """Like :func:`mmray.data.reader.iter_batches` (same batches for the same seed and epoch), read from the cache:
    the same order, and augmentation with the same seeded draws on the cached pixels. ``tokenizer``: the job's,
    when the caller has it loaded (nothing is tokenised here; it saves loading it again). ``with_ids``: each batch
    also has ``"id"`` (list[str]), as the shard reader's.

    ``rows`` (split -> sorted row positions in that split): read only those rows, from each split it names (a
    cross-validation fold of train+val, :mod:`mmray.data.folds`); ``split`` is then ignored. The parts of every
    split named are shuffled together as one split's are."""
    import torch

    rng = np.random.default_rng([seed, epoch])
    pre = Preprocessor(data, info, train=train, seed=int(rng.integers(2**31)), tokenizer=tokenizer)
    splits = list(rows) if rows is not None else [split] if isinstance(split, str) else list(split)
    by_unit: dict[tuple[str, int], tuple[str, str]] = {}  # (split/shard number, row group) -> (split, part)
    for s in splits:
        names = entry.parts(s)
        for (shard, group), name in zip(part_units(names), names):
            by_unit[(f"{s}/{shard}", group)] = (s, name)
    units = list(by_unit)
    order = Shuffle.for_data(data, batch_size, train)
    if order.units:
        units = shuffled_units(units, rng)
    picked = _picked_rows(entry, splits, rows) if rows is not None else {}
    held = Held()
    parts = ((read_part(entry.part_path(*by_unit[u]), data, ids=with_ids), picked.get(by_unit[u])) for u in units)
    sizes = (held.add((arrays, index), n if index is None else len(index)) for (n, arrays), index in parts)
    for ids in batch_rows(sizes, batch_size, order.window, rng if order.mix else None):
        batch = _gather(held, ids)
        held.done(held.locate(ids)[0])
        row_ids = batch.pop("id", None)
        out = {k: torch.from_numpy(v) for k, v in pre.finish(batch).items()}
        if row_ids is not None:
            out["id"] = [str(i) for i in row_ids]
        yield out


def _picked_rows(entry: DecodedEntry, splits: list[str], rows: Mapping[str, np.ndarray]) -> dict:
    """``(split, part) -> the part's own row numbers`` of ``rows`` (split -> row positions in the split): the parts
    of a split hold its rows in order, so each part covers the positions after the parts before it."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for s in splits:
        wanted, start = np.asarray(rows[s], dtype=np.int64), 0
        for name in entry.parts(s):
            n = _part_rows(entry.part_path(s, name))
            lo, hi = np.searchsorted(wanted, [start, start + n])
            out[(s, name)] = wanted[lo:hi] - start
            start += n
    return out


def _part_rows(path: str) -> int:
    """Rows of one part file (memory-mapped: no array is read)."""
    return _open_part(path).num_rows


def readable_entry(data, info: DatasetInfo, *, tokenizer=None) -> DecodedEntry | None:
    """The entry an evaluation of ``data`` (a job's or an export's ``data`` section, ``data.path`` the dataset of
    ``info``) may read instead of decoding, or None. Never builds one: an evaluation reads what a run or a sweep
    built. ``tokenizer``: the reader's (an export's own); its fingerprint must be the entry's.

    A reader that skips bad records (evaluate, predict, the control arms) may also read an entry built with
    ``on_bad_record: fail``: such a build stops at the first bad record, so it holds none and its rows are the same."""
    if data.decode_cache == "off" or "://" in data.path:
        return None
    settings = [data.on_bad_record] + (["fail"] if data.on_bad_record == "skip" else [])
    for on_bad_record in settings:
        config = _DataOnly(data.model_copy(update={"on_bad_record": on_bad_record}))
        entry = find_entry(config, info, key_parts(config, info, tokenizer=tokenizer))
        if entry is not None:
            return entry
    return None


@dataclass(frozen=True)
class _DataOnly:
    """A job's stand-in where only its ``data`` section decides (the key of an entry)."""

    data: Any


def eval_batches(data, info: DatasetInfo, split: str, *, batch_size: int, with_ids: bool = False, tokenizer=None,
                 preprocessor=None) -> Iterator[dict]:
    """Batches of ``split`` to evaluate or predict on (file order, no augmentation): read from the decoded-input
    cache when an entry of this key holds the split (:func:`readable_entry`), else decoded from the shards
    (``preprocessor``: the one to decode with, e.g. an export's). The same batches either way."""
    entry = readable_entry(data, info, tokenizer=tokenizer)
    if entry is not None and entry.has(split):
        return iter_decoded_batches(entry, data, info, split, batch_size=batch_size, train=False, tokenizer=tokenizer,
                                    with_ids=with_ids)
    return iter_batches(data, info, split, batch_size=batch_size, train=False, shuffle=False, with_ids=with_ids,
                        preprocessor=preprocessor)


def decoded_readers(config, decoded: DecodePlan):
    """``(train_batches, val_batches)``: ``epoch -> batches``, as :func:`mmray.data.reader.split_readers`, read from
    the cache when ``decoded`` is used, from the dataset's shards otherwise."""
    if not decoded.used:
        return split_readers(config)
    return _readers(config, decoded.entry, ("train", None), ("val", None))


def fold_readers(config, decoded: DecodePlan, train_rows: Mapping[str, np.ndarray],
                 held_out_rows: Mapping[str, np.ndarray]):
    """``(train_batches, val_batches)`` of one cross-validation fold (:class:`mmray.data.folds.Folds`): training on
    ``train_rows`` and validating on ``held_out_rows`` (split -> row positions of train and val), both read from the
    decoded-input cache: a fold is a row subset of what the cache holds, never decoded again.

    Raises:
        RunError: ``decoded`` is not used (a fold is read from the cache only).
    """
    if not decoded.used:
        raise RunError(f"cross-validation folds are read from the decoded-input cache, which this run cannot use: "
                       f"{decoded.reason}")
    return _readers(config, decoded.entry, ("train", train_rows), ("val", held_out_rows))


def _readers(config, entry: DecodedEntry, train: tuple, val: tuple):
    info = read_dataset_info(config.data.path)
    bs, seed = config.train.batch_size, config.train.seed
    tokenizer = TextTokenizer.load(config.data.text, info) if "text" in config.data.modalities else None

    def reader(split: str, rows, train: bool):
        def batches(epoch: int):
            return iter_decoded_batches(entry, config.data, info, split, batch_size=bs, train=train,
                                        seed=seed, epoch=epoch, tokenizer=tokenizer, rows=rows)
        return batches

    return reader(*train, True), reader(*val, False)


class _ReadDecoded:
    """``map_batches`` UDF: reads parts of an entry and finishes them (augmentation, normalisation) with the
    process's :meth:`~mmray.data.decode.Preprocessor.shared` preprocessor, as decoding tasks do."""

    def __init__(self, data: DataConfig, info: DatasetInfo, train: bool, seed: int, entry_path: str, split: str):
        self.data, self.info, self.train, self.seed = data, info, train, seed
        self.entry_path, self.split = entry_path, split

    def __call__(self, units: dict[str, Any]) -> Iterator[dict[str, Any]]:
        pre, step = Preprocessor.shared(self.data, self.info, self.train, self.seed), self.data.decode_batch_size
        for part in units["part"]:
            n, arrays = read_part(os.path.join(self.entry_path, self.split, str(part)), self.data)
            for start in range(0, n, step):  # copies one slice at a time out of the memory-mapped file
                yield pre.finish(rows_of(arrays, start, start + step))


def build_decoded_dataset(data: DataConfig, info: DatasetInfo, entry: DecodedEntry, split: str, *, train: bool,
                          seed: int = 0):
    """:func:`mmray.data.pipeline.build_dataset` read from ``entry`` instead of the shards: a lazy
    ``ray.data.Dataset`` with the same rows and batch format, no decoding; augmentation still runs on the cached
    pixels (for TorchTrainer workers)."""
    import ray

    Preprocessor(data, info, train=train, seed=seed)  # fail fast on the driver with a clear message
    units = [{"part": p} for p in entry.parts(split)]
    from mmray.data.pipeline import order_units, shuffle_rows  # imports Ray Data: only when a run builds it

    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    shuffle = data.shuffle if train else "none"  # global: the cached (decoded) rows go through the shuffle
    ds = order_units(ds, shuffle, seed).map_batches(_ReadDecoded(data, info, train, seed, entry.path, split),
                                                    batch_size=1, batch_format="numpy", num_cpus=data.decode_cpus)
    return shuffle_rows(ds, shuffle, seed)


# --------------------------------------------------------------------------------------------- listing
def list_decoded(path: str) -> list[dict]:
    """The decoded-input cache entries of the dataset at ``path``: name, modalities, rows, bytes, built, stale."""
    info = read_dataset_info(path)

    def describe(m: dict, other_data: bool) -> dict:
        return {"modalities": m["modalities"], "bytes": m["bytes"],
                "rows": {s: v["rows"] for s, v in m["splits"].items()},
                "bad_records": sum(v.get("bad_records", 0) for v in m["splits"].values()),
                "built": m["built"], "stale": other_data or m["key"].get("format") != FORMAT}
    return list_entries(cache_root(info), info, describe)

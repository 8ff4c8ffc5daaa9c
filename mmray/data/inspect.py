"""``mmray data inspect DIR``: a human-readable report of a dataset directory."""
from __future__ import annotations

import io
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmray.data.cache import CACHE_DIR, list_caches
from mmray.data.dataset_dir import MEDIA_COLUMNS, DatasetInfo, read_dataset_info, resolve_fs
from mmray.data.decoded import CACHE_DIR as DECODED_DIR
from mmray.data.decoded import list_decoded
from mmray.storage import human_size

SAMPLE_ROWS = 3
TEXT_PREVIEW = 70


def inspect_dataset(path: str) -> str:
    """The report: origin, rows per split, class balance, modality availability, rejected rows, samples.

    Raises:
        UserError: ``path`` is not a dataset directory.
    """
    info = read_dataset_info(path)
    lines = [f"dataset {info.path}"]
    created = info.created
    if created:
        lines.append(f"  made by: {created.get('command') or created.get('source')} ({created.get('time')})")
    lines.append(f"  modalities: {', '.join(info.modalities)}")
    lines.append(f"  classes ({len(info.class_names)}): {', '.join(info.class_names)}")
    extra = [t for t in info.tasks if t != "label"]
    if extra:
        lines.append("  extra tasks: " + ", ".join(f"{t} ({len(info.tasks[t])} classes)" for t in extra))
    lines.append(f"  tokenizer: {info.tokenizer or 'none (set data.text.tokenizer)'}")
    lines.append("")
    lines += _splits_table(info)
    lines.append("")
    lines.append("class balance (rows per class):")
    lines += _balance_table(info)
    lines.append("")
    rej = info.rejected
    lines.append(f"rejected rows: {rej.get('rows', 0)}")
    for reason, count in sorted((rej.get("by_reason") or {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {count:>8}  {reason}")
    if "rows_in" in rej:  # made by `data prepare`
        lines.append(f"rows in the manifest: {rej['rows_in']}, kept: {rej.get('kept')}, "
                     f"kept with a missing modality: {rej.get('partly_missing', 0)}")
        for reason, count in sorted((rej.get("missing_by_reason") or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:>8}  {reason}")
        if rej.get("rows") or rej.get("partly_missing"):
            lines.append(f"  every decision, row by row: {info.path}/{rej.get('file', 'rejected.jsonl')}")
    lines.append("")
    lines.append("sample rows:")
    lines += _samples(info)
    lines.append("")
    lines += _caches_table(info)
    lines += _decoded_table(info)
    return "\n".join(lines) + "\n"


def _caches_table(info: DatasetInfo) -> list[str]:
    """The embedding caches under ``.cache/embeddings`` with their sizes (see :mod:`mmray.data.cache`)."""
    caches = list_caches(info.path)
    if not caches:
        return ["embedding caches: none"]
    total = sum(c["bytes"] for c in caches)
    out = [f"embedding caches ({len(caches)}, {human_size(total)} in {CACHE_DIR}):",
           f"  {'entry':<40} {'encoder':<14} {'train':>7} {'val':>6} {'size':>9}  built"]
    for c in caches:
        note = ("  +sequences" if c["sequences"] else "") + ("  STALE: the dataset changed" if c["stale"] else "")
        out.append(f"  {c['name']:<40} {c['encoder']:<14} {c['rows'].get('train', 0):>7} {c['rows'].get('val', 0):>6} "
                   f"{human_size(c['bytes']):>9}  {c['built']}{note}")
    return out


def _decoded_table(info: DatasetInfo) -> list[str]:
    """The decoded-input caches under ``.cache/decoded`` with their sizes (see :mod:`mmray.data.decoded`)."""
    caches = list_decoded(info.path)
    if not caches:
        return ["decoded-input caches: none"]
    total = sum(c["bytes"] for c in caches)
    out = [f"decoded-input caches ({len(caches)}, {human_size(total)} in {DECODED_DIR}):",
           f"  {'entry':<40} {'train':>7} {'val':>6} {'test':>6} {'size':>9}  built"]
    for c in caches:
        note = (f"  {c['bad_records']} bad records" if c["bad_records"] else "") + (
            "  STALE: the dataset changed" if c["stale"] else "")
        out.append(f"  {c['name']:<40} {c['rows'].get('train', 0):>7} {c['rows'].get('val', 0):>6} "
                   f"{c['rows'].get('test', 0):>6} {human_size(c['bytes']):>9}  {c['built']}{note}")
    return out


def _splits_table(info: DatasetInfo) -> list[str]:
    mods = list(info.modalities)
    head = f"{'split':<8}{'rows':>10}{'shards':>8}" + "".join(f"{m + ' present':>18}" for m in mods)
    out = [head]
    for split, s in info.splits.items():
        present = dict(s.present) if s.present is not None else _count_present(info, split)
        cells = "".join(f"{_pct(present.get(m, 0), s.rows):>18}" for m in mods)
        out.append(f"{split:<8}{s.rows:>10}{len(s.files):>8}{cells}")
    return out


def _pct(n: int, total: int) -> str:
    return f"{n} ({100.0 * n / total:.1f}%)" if total else "0"


def _count_present(info: DatasetInfo, split: str) -> dict[str, int]:
    """Non-null cells per modality, by scanning the shards (datasets whose dataset.json has no counts)."""
    counts: Counter = Counter()
    for f in info.split_files(split):
        pf = _open(f)
        cols = [m for m in MEDIA_COLUMNS if m in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            for m in cols:
                counts[m] += len(batch) - batch.column(m).null_count
    return dict(counts)


def _balance_table(info: DatasetInfo) -> list[str]:
    per_split = {}
    for split in info.splits:
        counts: Counter = Counter()
        for f in info.split_files(split):
            labels = _open(f).read(columns=["label"]).column("label")
            for v, c in zip(*(pc.value_counts(labels).flatten())):
                counts[v.as_py()] += c.as_py()
        per_split[split] = counts
    width = max([len(c) for c in info.class_names] + [5])
    out = [f"  {'class':<{width}}" + "".join(f"{s:>10}" for s in per_split)]
    for i, name in enumerate(info.class_names):
        out.append(f"  {name:<{width}}" + "".join(f"{per_split[s].get(i, 0):>10}" for s in per_split))
    return out


def _samples(info: DatasetInfo) -> list[str]:
    split = "train" if "train" in info.splits else next(iter(info.splits))
    files = info.split_files(split)
    if not files:
        return ["  (no rows)"]
    table = _open(files[0]).read_row_group(0).slice(0, SAMPLE_ROWS).to_pylist()
    out = []
    for row in table:
        label = row.get("label")
        name = info.class_names[label] if label is not None and 0 <= label < len(info.class_names) else "?"
        out.append(f"  {row['id']}  label {label} ({name})")
        if "text" in row:
            text = row["text"]
            shown = "(missing)" if text is None else repr(text if len(text) <= TEXT_PREVIEW else text[:TEXT_PREVIEW] + "...")
            out.append(f"      text:  {shown}")
        if "image" in row:
            out.append(f"      image: {_image_desc(row['image'])}")
        if "audio" in row:
            out.append(f"      audio: {_audio_desc(row['audio'])}")
    return out


def _image_desc(data: bytes | None) -> str:
    if data is None:
        return "(missing)"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return f"{img.format} {img.size[0]}x{img.size[1]} {img.mode}, {len(data)} bytes"
    except Exception as e:  # a report shows the problem instead of failing
        return f"unreadable ({e})"


def _audio_desc(data: bytes | None) -> str:
    if data is None:
        return "(missing)"
    import soundfile as sf

    try:
        i = sf.info(io.BytesIO(data))
        return f"{i.format} {i.duration:.2f} s, {i.samplerate} Hz, {i.channels} channel(s), {len(data)} bytes"
    except Exception as e:  # a report shows the problem instead of failing
        return f"unreadable ({e})"


def _open(path: str) -> pq.ParquetFile:
    fs, inner = resolve_fs(path)
    return pq.ParquetFile(fs.open_input_file(inner))

"""Ingest benchmark: mmray's Ray Data pipeline vs a torch DataLoader on the same shards and decode work.

Run with:

    .venv/bin/python benchmarks/ingest.py                      # 5,000 synth rows in a temp dir
    .venv/bin/python benchmarks/ingest.py --data data/synth    # an existing dataset directory
    .venv/bin/python benchmarks/ingest.py --sweep              # also try other pipeline settings
    .venv/bin/python benchmarks/ingest.py --memory-rows 10000  # + peak memory streaming > object store
    .venv/bin/python benchmarks/ingest.py --rows 2000 --image-size 224 --image-format jpeg --audio-seconds 10
                                   # realistic media; the job decodes at its defaults (32 px, 1 s at 8 kHz)
    ... --job-image-size 224 --job-audio-seconds 10 --job-sample-rate 16000   # the job at the data's size

Both sides read the train split's Parquet shards and decode every row with the same
:class:`mmray.data.decode.Preprocessor` (``train=False``, so no random augmentation). Each side runs
one warm-up epoch, then ``--epochs`` timed epochs; the consumer only counts rows and bytes. Per side:
rows/s, MB/s (shard bytes read and decoded tensor bytes delivered), time to the first batch of each
epoch, the peak RSS and PSS summed over this process and its children while that side ran, and for
Ray the peak object-store use and the bytes spilled (sampled from the raylet). The DataLoader
uses ``num_workers=os.cpu_count()`` persistent workers over an IterableDataset that splits the
shards' row groups among workers. The DataLoader runs first, before Ray starts, so forked workers
never inherit Ray's threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mmray.config.schema import DataConfig  # noqa: E402
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info  # noqa: E402
from mmray.data.decode import Preprocessor  # noqa: E402
from mmray.data.reader import read_row_group, row_group_units, table_columns  # noqa: E402
from mmray.data.synth import Media, synth  # noqa: E402

SPLIT = "train"


# ------------------------------------------------------------------------------ DataLoader side
class ShardStream(torch.utils.data.IterableDataset):
    """Decoded batches of a split; each DataLoader worker takes every W-th row group of the shards."""

    def __init__(self, data: DataConfig, info: DatasetInfo, batch_size: int):
        self.data, self.info, self.batch_size = data, info, batch_size
        self.units = row_group_units(info, SPLIT)
        self._pre = None

    def __iter__(self):
        w = torch.utils.data.get_worker_info()
        wid, nw = (w.id, w.num_workers) if w else (0, 1)
        if self._pre is None:  # once per worker process (persistent workers)
            self._pre = Preprocessor(self.data, self.info, train=False)
        for path, group in self.units[wid::nw]:
            table = read_row_group(path, group, self.data, self.info)
            for start in range(0, table.num_rows, self.batch_size):
                decoded = self._pre(table_columns(table.slice(start, self.batch_size)))
                yield {k: torch.from_numpy(v) for k, v in decoded.items()}


def make_dataloader(data, info, batch_size, workers):
    return torch.utils.data.DataLoader(
        ShardStream(data, info, batch_size), batch_size=None, num_workers=workers, persistent_workers=workers > 0
    )


# ------------------------------------------------------------------------------ Ray side
def ray_epoch(data, info, batch_size, reader="mmray"):
    """One epoch's iterator: mmray's pipeline, or (reader="read_parquet") Ray's own Parquet reader + the same decode."""
    from mmray.data.pipeline import build_dataset

    if reader == "read_parquet":
        import ray

        from mmray.data.pipeline import _ReadDecode

        pre = _ReadDecode(data, info, False, 0)
        ds = ray.data.read_parquet(info.split_files(SPLIT)).map_batches(
            lambda b: pre._preprocessor()(b), batch_format="numpy", batch_size=data.decode_batch_size
        )
    else:
        from mmray.data import pipeline

        # "mmray-buffered": Ray Data's own output buffering (up to 128 MB per block), as before each decode
        # batch became its own block.
        pipeline.BLOCK_PER_DECODE_BATCH = reader != "mmray-buffered"
        pipeline.CAP_DECODE_TASKS = reader not in ("mmray-buffered", "mmray-uncapped")  # as before issue 14
        ds = build_dataset(data, info, SPLIT, train=False)
        pipeline.BLOCK_PER_DECODE_BATCH = pipeline.CAP_DECODE_TASKS = True
    return ds.iter_torch_batches(batch_size=batch_size)


class Epoch(float):
    """Rows/s of one epoch (a float, so the old callers keep working), with the seconds to its first batch and the
    decoded bytes it delivered."""

    first_batch_s: float
    decoded_bytes: int
    seconds: float
    cpu_s: float  # CPU seconds of the whole process tree during the epoch
    rows: int


def rows_per_s(batches, pids: set[int] | None = None) -> Epoch:
    cpu0 = _tree_cpu(os.getpid(), pids)
    t0, rows, decoded, first = time.perf_counter(), 0, 0, None
    for batch in batches:
        if first is None:
            first = time.perf_counter() - t0
        rows += len(batch["label"])
        decoded += sum(v.numel() * v.element_size() for v in batch.values())
    secs = time.perf_counter() - t0
    e = Epoch(rows / secs)
    e.first_batch_s, e.decoded_bytes, e.seconds = first or secs, decoded, secs
    e.cpu_s = _tree_cpu(os.getpid(), pids) - cpu0
    e.rows = rows
    return e


class StoreSampler:
    """Peak object-store bytes in use and bytes spilled so far, sampled from the raylet every ``interval`` s.

    Uses Ray's internal memory API (what ``ray memory --stats-only`` prints); if a Ray upgrade moves it, the
    figures are None rather than the benchmark failing.
    """

    def __init__(self, interval=0.5):
        self.interval, self.peak, self.spilled = interval, None, None
        try:
            import ray
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
            self._reply = get_memory_info_reply
        except Exception:  # noqa: BLE001 - a private API: no figures rather than no benchmark
            self._state = None

    def _sample(self):
        if self._state is None:
            return
        try:
            stats = self._reply(self._state).store_stats
        except Exception:  # noqa: BLE001
            return
        self.peak = max(self.peak or 0, stats.object_store_bytes_used)
        self.spilled = stats.spilled_bytes_total

    def _run(self, stop):
        while not stop.is_set():
            self._sample()
            stop.wait(self.interval)

    def __enter__(self):  # re-enterable, like PeakMemory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def start_ray(num_cpus, object_store_memory=None, cpu_limit=None, fast_start=False):
    import ray

    from mmray.data.pipeline import configure_data_context

    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    configure_data_context(cpu_limit=cpu_limit, fast_start=fast_start)


# ------------------------------------------------------------------------------ memory
def _tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``root`` and its descendants, read from /proc (Linux)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    rss = pss = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def _tree_cpu(root: int, only: set[int] | None = None) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its descendants, read from /proc (Linux).

    On a shared box a side's CPU per row is steadier than its wall time: it does not depend on how much of
    the cores the neighbours left us. ``only``: count ``root`` and just these descendants (the DataLoader's
    workers). Ray's idle workers exit between epochs and take their CPU time with them, so Ray's figure is
    a lower bound.
    """
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                # utime + stime, and cutime + cstime: a worker that exited (Ray reaps idle ones) still counts
                # in its parent once reaped
                stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, (pp, _) in stats.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    if only is not None:
        tree = {root} | (only & tree)
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


class PeakMemory:
    """Samples the summed RSS and PSS of this process and all its descendants (Ray's raylet, workers...).

    RSS counts shared pages (the object store's shared memory) once per process that maps them;
    PSS splits them among those processes, so PSS is the tree's real footprint.
    """

    def __init__(self, interval=0.25):
        self.interval, self.peak_rss, self.peak_pss = interval, 0, 0

    def _run(self, stop):
        while not stop.is_set():
            rss, pss = _tree_memory(os.getpid())
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            stop.wait(self.interval)

    def __enter__(self):  # re-enterable: each `with` samples again, the peaks carry on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_memory(rows, args, tmp, fast_start):
    import ray

    path = os.path.join(tmp, f"mem-{rows}")
    if not os.path.exists(os.path.join(path, "dataset.json")):
        synth(path, rows=rows, shards=8, seed=0)
    info = read_dataset_info(path)
    data = DataConfig(path=path, decode_batch_size=args.decode_batch_size)
    on_disk = sum(os.path.getsize(f) for f in info.split_files(SPLIT))
    store = 100 * 2**20
    start_ray(args.num_cpus, object_store_memory=store, fast_start=fast_start)
    from mmray.data.pipeline import build_dataset

    baseline = _tree_memory(os.getpid())[1]
    with PeakMemory() as mem:
        t0, n, decoded = time.perf_counter(), 0, 0
        for _ in range(2):
            for b in build_dataset(data, info, SPLIT, train=True).iter_torch_batches(batch_size=args.batch_size):
                n += len(b["label"])
                time.sleep(args.consumer_delay)  # a training step: lets the producer run ahead
                decoded += sum(v.numel() * v.element_size() for v in b.values())
        secs = time.perf_counter() - t0
    ray.shutdown()
    return {
        "fast_start": fast_start, "consumer_delay_s": args.consumer_delay, "rows_streamed": n, "epochs": 2, "split_rows": info.split_rows(SPLIT), "shard_bytes": on_disk,
        "decoded_bytes_per_epoch": decoded // 2, "object_store_bytes": store, "seconds": secs,
        "peak_rss_tree": mem.peak_rss, "peak_pss_tree": mem.peak_pss, "tree_pss_before": baseline,
    }


# ------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset directory; default: synth --rows ROWS into a temp dir")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode-batch-size", type=int, default=DataConfig.model_fields["decode_batch_size"].default)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="ray.init(num_cpus=...)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader num_workers")
    ap.add_argument("--sweep", action="store_true", help="also time other Ray settings (decode batch, num_cpus)")
    ap.add_argument("--decode-cpus", type=float, nargs="*", default=[],
                    help="also time these data.decode_cpus (default: the job default)")
    ap.add_argument("--before", action="store_true",
                    help="also time the pipeline without the decode-task cap, and without it and one block per "
                         "decode batch (as before issue 14)")
    ap.add_argument("--memory-rows", type=int, default=0, help="rows of the larger-than-object-store dataset")
    ap.add_argument("--consumer-delay", type=float, default=0.02, help="seconds per batch in the memory run")
    ap.add_argument("--image-size", type=int, default=Media.image_size, help="synth: image side of the data")
    ap.add_argument("--image-format", default=Media.image_format, help="synth: jpeg, png or webp")
    ap.add_argument("--audio-seconds", type=float, default=Media.audio_seconds, help="synth: recording length")
    ap.add_argument("--sample-rate", type=int, default=Media.sample_rate, help="synth: audio sample rate")
    ap.add_argument("--job-image-size", type=int, default=None, help="data.image.size (default: the job default)")
    ap.add_argument("--job-audio-seconds", type=float, default=None, help="data.audio.seconds (default: job default)")
    ap.add_argument("--job-sample-rate", type=int, default=None, help="data.audio.sample_rate (default: job default)")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="mmray-ingest-")
    path = args.data
    media = Media(args.image_size, args.image_format, args.audio_seconds, args.sample_rate)
    if path is None:
        path = os.path.join(tmp, "synth")
        t0 = time.perf_counter()
        synth(path, rows=args.rows, shards=args.shards, seed=0, media=media)
        print(f"synth: {args.rows} rows, {args.shards} shards/split, {media} in {time.perf_counter() - t0:.1f} s "
              f"-> {path}")
    info = read_dataset_info(path)
    data = DataConfig(path=path, decode_batch_size=args.decode_batch_size)
    job = {"image": {"size": args.job_image_size}, "audio": {"seconds": args.job_audio_seconds,
                                                             "sample_rate": args.job_sample_rate}}
    data = data.model_copy(update={m: getattr(data, m).model_copy(update={k: v for k, v in kv.items() if v is not None})
                                   for m, kv in job.items()})
    shard_bytes = sum(os.path.getsize(f) for f in info.split_files(SPLIT))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; split {SPLIT}: "
          f"{info.split_rows(SPLIT)} rows in {len(info.split_files(SPLIT))} shards ({shard_bytes / 2**20:,.0f} MB); "
          f"job: image {data.image.size} px, audio {data.audio.seconds:g} s at {data.audio.sample_rate} Hz; "
          f"batch {args.batch_size}; {args.epochs} timed epochs after 1 warm-up")
    results = {"cpus": os.cpu_count(), "rows": info.split_rows(SPLIT), "batch_size": args.batch_size,
               "media": media.describe(), "job": {"image_size": data.image.size, "audio_seconds": data.audio.seconds,
                                                  "sample_rate": data.audio.sample_rate},
               "shard_bytes": shard_bytes, "load_average_start": os.getloadavg()[0]}

    # The DataLoader's persistent workers fork before Ray starts (no Ray threads in forked children);
    # then DataLoader and Ray epochs alternate, so both see the same background load.
    loader = make_dataloader(data, info, args.batch_size, args.workers)
    dl_warm = rows_per_s(loader)
    dl_pids = {w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", [])} or None  # persistent
    print(f"torch DataLoader(num_workers={args.workers}) warm-up: {dl_warm:,.0f} rows/s")
    import ray

    base = ("mmray", args.num_cpus, args.decode_batch_size, False)
    variants = [base]
    for cpus in args.decode_cpus:
        variants += [(f"mmray-decode-cpus-{cpus:g}", args.num_cpus, args.decode_batch_size, False)]
    if args.before:  # each change on its own: without the task cap, then also with Ray's block buffering
        variants += [("mmray-uncapped", args.num_cpus, args.decode_batch_size, False),
                     ("mmray-buffered", args.num_cpus, args.decode_batch_size, False)]
    if args.sweep:
        variants += [("mmray", args.num_cpus, args.decode_batch_size, True)]  # without ResourceBudget backpressure
        variants += [("read_parquet", args.num_cpus, args.decode_batch_size, False)]  # Ray's reader, defaults
        variants += [("mmray", args.num_cpus, b, False) for b in (32, 64, 1024) if b != args.decode_batch_size]
        variants += [("mmray", 2 * args.num_cpus, args.decode_batch_size, False)]
    results["runs"] = []
    for reader, num_cpus, dbs, fast_start in variants:
        start_ray(num_cpus, fast_start=fast_start)
        d = data.model_copy(update={"decode_batch_size": dbs})
        if reader.startswith("mmray-decode-cpus-"):
            d = d.model_copy(update={"decode_cpus": float(reader.rsplit("-", 1)[1])})
        dl, rr = [], []
        ray_mem, dl_mem, store = PeakMemory(), PeakMemory(), StoreSampler()
        with ray_mem, store:
            ray_warm = rows_per_s(ray_epoch(d, info, args.batch_size, reader))
        for _ in range(args.epochs):
            with dl_mem:
                dl.append(rows_per_s(loader, dl_pids))
            with ray_mem, store:
                rr.append(rows_per_s(ray_epoch(d, info, args.batch_size, reader)))
        ray.shutdown()
        dl_mean, ray_mean = sum(dl) / len(dl), sum(rr) / len(rr)
        mb = 2**20
        side = {}
        for name, eps in (("ray", rr), ("dataloader", dl)):
            secs = sum(e.seconds for e in eps)
            side[name] = {"rows_per_s": [float(e) for e in eps], "first_batch_s": [e.first_batch_s for e in eps],
                          "shard_mb_per_s": shard_bytes * len(eps) / mb / secs,
                          "cpu_ms_per_row": 1000 * sum(e.cpu_s for e in eps) / sum(e.rows for e in eps),
                          "decoded_mb_per_s": sum(e.decoded_bytes for e in eps) / mb / secs}
        side["ray"].update(peak_rss_mb=ray_mem.peak_rss / mb, peak_pss_mb=ray_mem.peak_pss / mb,
                           object_store_peak_mb=None if store.peak is None else store.peak / mb,
                           spilled_mb=None if store.spilled is None else store.spilled / mb, warmup=float(ray_warm),
                           warmup_first_batch_s=ray_warm.first_batch_s)
        side["dataloader"].update(peak_rss_mb=dl_mem.peak_rss / mb, peak_pss_mb=dl_mem.peak_pss / mb)
        print(f"[{reader}, ray num_cpus={num_cpus}, decode_batch_size={dbs}, fast_start={fast_start}] ray warm-up "
              f"{ray_warm:,.0f} rows/s (first batch {ray_warm.first_batch_s:.2f} s); timed ray {_fmt(rr)} vs "
              f"DataLoader {_fmt(dl)} -> {ray_mean:,.0f} vs {dl_mean:,.0f} rows/s = {ray_mean / dl_mean:.2f}x; "
              f"CPU per row: ray {side['ray']['cpu_ms_per_row']:.2f} ms vs DataLoader "
              f"{side['dataloader']['cpu_ms_per_row']:.2f} ms = "
              f"{side['dataloader']['cpu_ms_per_row'] / side['ray']['cpu_ms_per_row']:.2f}x; "
              f"load average {os.getloadavg()[0]:.1f}")
        for name, x in side.items():
            extra = (f", object store peak {x['object_store_peak_mb']:,.0f} MB, spilled {x['spilled_mb']:,.0f} MB"
                     if name == "ray" and x["object_store_peak_mb"] is not None else "")
            print(f"    {name}: {x['shard_mb_per_s']:,.1f} MB/s of shards, {x['decoded_mb_per_s']:,.0f} MB/s decoded, "
                  f"first batch {_fmt(x['first_batch_s'], '.2f')} s, peak tree RSS {x['peak_rss_mb']:,.0f} MB / PSS "
                  f"{x['peak_pss_mb']:,.0f} MB{extra}")
        results["runs"].append({"reader": reader, "num_cpus": num_cpus, "decode_batch_size": dbs, "fast_start": fast_start,
                                "ray_warmup": float(ray_warm), "ray": [float(e) for e in rr],
                                "dataloader": [float(e) for e in dl], "ratio": ray_mean / dl_mean, **side,
                                "load_average_end": os.getloadavg()[0]})
    del loader

    if args.memory_rows:
        results["memory"] = []
        for fast_start in (True, False):
            m = bench_memory(args.memory_rows, args, tmp, fast_start)
            mb = 2**20
            print(f"memory (fast_start={fast_start}): streamed {m['rows_streamed']} rows ({m['epochs']} epochs of "
                  f"{m['split_rows']}; shards {m['shard_bytes'] / mb:.0f} MB, decoded {m['decoded_bytes_per_epoch'] / mb:.0f}"
                  f" MB/epoch) through a {m['object_store_bytes'] / mb:.0f} MB object store, consumer "
                  f"{args.consumer_delay * 1000:.0f} ms/batch, in {m['seconds']:.1f} s; peak process-tree RSS "
                  f"{m['peak_rss_tree'] / mb:.0f} MB, PSS {m['peak_pss_tree'] / mb:.0f} MB (PSS before streaming "
                  f"{m['tree_pss_before'] / mb:.0f} MB)")
            results["memory"].append(m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _fmt(rates, spec=",.0f"):
    return ", ".join(f"{r:{spec}}" for r in rates)


if __name__ == "__main__":
    main()

"""``mmray data synth`` throughput: one process vs the process pool, at the default and at realistic media sizes.

Run with:

    .venv/bin/python benchmarks/synth.py                                   # 20,000 default rows (64 px PNG, 1 s)
    .venv/bin/python benchmarks/synth.py --rows 2000 --image-size 224 --image-format jpeg --audio-seconds 10
    .venv/bin/python benchmarks/synth.py --rows 100000 --rounds 1 --only-pool   # one long pool run

Each round writes the dataset with ``workers=1`` (everything in this process) and then with the pool
(``workers=N``, default one per CPU) into a fresh temp folder, so each pair ran under the same
background load; the folder is deleted after each run. Per run: wall seconds, rows/s, CPU milliseconds
per row (this process and its finished workers), MB written, and the peak RSS / PSS summed over this
process and its children (sampled every 0.25 s). Then a line extrapolating the pool's rate to
``--extrapolate`` rows (a straight line: every shard is independent, memory does not grow with rows).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ingest import PeakMemory  # noqa: E402  (the same process-tree sampler as the ingest benchmark)

from mmray.data.synth import Media, synth  # noqa: E402


def _cpu_s() -> tuple[float, float]:
    """CPU seconds of (this process, its finished children)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


class _Quiet:
    def add(self, rows: int) -> None:
        pass


def run(tmp: str, rows: int, shards: int, media: Media, workers: int) -> dict:
    out = os.path.join(tmp, f"w{workers}")
    cpu0, t0 = _cpu_s(), time.perf_counter()
    with PeakMemory() as mem:
        synth(out, rows=rows, shards=shards, seed=0, media=media, workers=workers, progress=_Quiet())
    secs, cpu1 = time.perf_counter() - t0, _cpu_s()
    parent, kids = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    size = _bytes(out)
    shutil.rmtree(out)
    return {"workers": workers, "rows": rows, "seconds": secs, "rows_per_s": rows / secs,
            "cpu_ms_per_row": 1000 * (parent + kids) / rows, "parent_cpu_ms_per_row": 1000 * parent / rows,
            "workers_cpu_ms_per_row": 1000 * kids / rows,
            "mb_written": size / 2**20, "mb_per_s": size / 2**20 / secs,
            "peak_rss_mb": mem.peak_rss / 2**20, "peak_pss_mb": mem.peak_pss / 2**20}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=0, help="shards per split (default: rows / 2000, at least 4)")
    ap.add_argument("--image-size", type=int, default=Media.image_size)
    ap.add_argument("--image-format", default=Media.image_format)
    ap.add_argument("--audio-seconds", type=float, default=Media.audio_seconds)
    ap.add_argument("--sample-rate", type=int, default=Media.sample_rate)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="the pool's processes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only-pool", action="store_true", help="skip the one-process runs")
    ap.add_argument("--extrapolate", type=int, default=1_000_000, help="rows to extrapolate the pool's time to")
    ap.add_argument("--tmp", default=None, help="folder for the datasets (default: a new temp folder)")
    ap.add_argument("--json", help="write all numbers to this file")
    args = ap.parse_args(argv)

    media = Media(args.image_size, args.image_format, args.audio_seconds, args.sample_rate)
    shards = args.shards or max(4, args.rows // 2000)
    tmp = tempfile.mkdtemp(prefix="mmray-synth-bench-", dir=args.tmp)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.rows:,} rows, {shards} "
          f"shards/split; {media}")
    results = []
    try:
        for r in range(args.rounds):
            for workers in ([] if args.only_pool else [1]) + [args.workers]:
                m = run(tmp, args.rows, shards, media, workers)
                m["round"], m["load_average"] = r, os.getloadavg()[0]
                results.append(m)
                split = (f" (parent {m['parent_cpu_ms_per_row']:.3f}, workers {m['workers_cpu_ms_per_row']:.2f})"
                         if workers > 1 else "")
                print(f"round {r} workers={workers}: {m['seconds']:.1f} s, {m['rows_per_s']:,.0f} rows/s, "
                      f"{m['cpu_ms_per_row']:.2f} CPU ms/row{split}, {m['mb_written']:,.0f} MB ({m['mb_per_s']:.0f} MB/s), "
                      f"peak tree RSS {m['peak_rss_mb']:,.0f} MB / PSS {m['peak_pss_mb']:,.0f} MB, "
                      f"load average {m['load_average']:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pool = [m for m in results if m["workers"] == args.workers]
    serial = [m for m in results if m["workers"] == 1]
    rate = sum(m["rows_per_s"] for m in pool) / len(pool)
    if serial and args.workers != 1:
        ratio = sum(p["rows_per_s"] / s["rows_per_s"] for p, s in zip(pool, serial)) / len(serial)
        print(f"pool / one process: {ratio:.2f}x (mean of the {len(serial)} pairs)")
    mb_row = pool[0]["mb_written"] / args.rows
    cpu_row = min(m["cpu_ms_per_row"] for m in results) / 1000
    parent_row = sum(m["parent_cpu_ms_per_row"] for m in pool) / len(pool) / 1000
    print(f"extrapolated: {args.extrapolate:,} rows, {args.extrapolate * mb_row / 1024:,.1f} GB: at this run's pool rate "
          f"({rate:,.0f} rows/s) {args.extrapolate / rate / 60:.1f} min; on {args.workers} idle cores at the lowest CPU "
          f"cost per row measured ({cpu_row * 1000:.2f} ms) {args.extrapolate * cpu_row / args.workers / 60:.1f} min "
          f"(the parent's share, {parent_row * 1000:.3f} ms/row, caps the pool at "
          f"{cpu_row / max(parent_row, 1e-9):,.0f}x one process)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"media": media.describe(), "shards": shards, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()

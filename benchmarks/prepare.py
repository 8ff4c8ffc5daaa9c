"""``mmray data prepare`` throughput: serial vs a process pool (and, with ``--ray``, Ray Data) on the same files.

Run with:

    .venv/bin/python benchmarks/prepare.py                    # 3,000 rows, 256 px JPEG + 1 s WAV + caption
    .venv/bin/python benchmarks/prepare.py --rows 20000 --ray # bigger, and the media stage on Ray Data too
    .venv/bin/python benchmarks/prepare.py --image-format png --audio-format flac   # costlier decodes
    .venv/bin/python benchmarks/prepare.py --rows 8000 --on-ray --chunk-rows 500   # serial vs prepare on Ray

Makes a folder of real files (the built-in dataset's pictures upscaled to ``--image-size`` and saved
as JPEG, its 16 kHz WAV tones, its captions) and a CSV manifest, then times, alternating so each
pair of numbers ran under the same background load:

- **end to end**: ``prepare(..., workers=1)`` (everything in this process) vs ``workers=N`` (the
  process pool): rows/s over the whole run, including the manifest, shards and tokenizer;
- **media stage only** (``--ray``): the same :func:`mmray.data.prepare.check_media` over the same
  64-row chunks, serially, in the process pool, and as a Ray Data ``map_batches`` on a local Ray.

With ``--on-ray`` it times instead ``prepare(..., ray="off", workers=1)`` against ``prepare(..., ray="on")``
on a local Ray of ``--workers`` CPUs (tasks of ``--chunk-rows`` rows check, decode and write their own
shards), alternating, and this process's CPU per row in each (Ray's worker processes are not its children:
the driver's share is what bounds the speed-up idle cores or more nodes can give).

Peak RSS of this process is printed after the runs (worker processes hold at most ``2 x workers``
chunks of file bytes).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from PIL import Image  # noqa: E402

from mmray.data.manifest import ColumnMap  # noqa: E402
from mmray.data.prepare import CHUNK_ROWS, _map_media, check_media, prepare  # noqa: E402
from mmray.data.synth import CLASS_NAMES, PITCHES, SHAPES, _audio, _image, _text  # noqa: E402


def make_files(root: str, rows: int, image_size: int, image_format: str = "jpg", audio_format: str = "wav") -> str:
    media = os.path.join(root, "media")
    os.makedirs(media, exist_ok=True)
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "audio", "text", "label"])
        for i in range(rows):
            rng = np.random.default_rng([0, i])
            label = int(rng.integers(len(CLASS_NAMES)))
            shape, pitch = SHAPES[label // 2], PITCHES[label % 2]
            img = Image.open(io.BytesIO(_image(rng, shape))).resize((image_size, image_size), Image.BILINEAR)
            img.save(os.path.join(media, f"{i}.{image_format}"), **({"quality": 90} if image_format == "jpg" else {}))
            wav = _audio(rng, pitch)
            if audio_format == "flac":
                data, rate = sf.read(io.BytesIO(wav), dtype="int16")
                sf.write(os.path.join(media, f"{i}.flac"), data, rate, format="FLAC")
            else:
                with open(os.path.join(media, f"{i}.wav"), "wb") as out:
                    out.write(wav)
            w.writerow([f"r{i}", f"media/{i}.{image_format}", f"media/{i}.{audio_format}", _text(rng, shape, pitch),
                         CLASS_NAMES[label]])
    return os.path.join(root, "manifest.csv")


def _cpu_s() -> np.ndarray:
    """CPU seconds of (this process, its finished child processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime])


def end_to_end(manifest: str, root: str, workers: int) -> tuple[float, float, float]:
    """``(rows/s wall, CPU ms per row in all processes, CPU ms per row in this process)``."""
    out = os.path.join(root, f"ds-{workers}")
    cpu = _cpu_s()
    report = prepare(manifest, out, workers=workers, columns=ColumnMap())
    cpu = 1000 * (_cpu_s() - cpu) / report.rows_in
    shutil.rmtree(out)
    return report.rows_in / report.seconds, float(cpu.sum()), float(cpu[0])


def end_to_end_on_ray(manifest: str, root: str, chunk_rows: int) -> tuple[float, float]:
    """``(rows/s wall, CPU ms per row in this process)`` of ``prepare(..., ray="on")``."""
    out = os.path.join(root, "ds-ray")
    cpu = _cpu_s()[0]
    report = prepare(manifest, out, ray="on", chunk_rows=chunk_rows, columns=ColumnMap())
    cpu = 1000 * (_cpu_s()[0] - cpu) / report.rows_in
    shutil.rmtree(out)
    return report.rows_in / report.seconds, float(cpu)


def on_ray(manifest: str, root: str, args) -> None:
    import ray

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    end_to_end(manifest, root, 1)  # warm-up: imports, page cache
    end_to_end_on_ray(manifest, root, args.chunk_rows)  # warm-up: Ray's worker processes
    serial, remote = [], []
    for _ in range(args.rounds):
        serial.append(end_to_end(manifest, root, 1))
        remote.append(end_to_end_on_ray(manifest, root, args.chunk_rows))
    (s, s_cpu, _), (r, r_driver) = np.mean(serial, axis=0), np.mean(remote, axis=0)
    tasks = -(-args.rows // args.chunk_rows)
    print(f"end to end   serial {s:8.0f} rows/s   on Ray ({args.workers} CPUs, {tasks} tasks) {r:8.0f} rows/s   "
          f"ray/serial {r / s:.2f}x")
    print(f"CPU per row  serial {s_cpu:8.2f} ms   on Ray: {r_driver:.2f} ms in this process (manifest, row checks, "
          f"merge): with idle cores the speed-up is bounded by {s_cpu / r_driver:.0f}x")
    print(f"load average during the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def media_chunks(rows: int, image_format: str, audio_format: str) -> list[list[tuple[int, dict]]]:
    items = [(i + 1, {"_cells": {"image": f"media/{i}.{image_format}", "audio": f"media/{i}.{audio_format}"}})
             for i in range(rows)]
    return [items[i : i + CHUNK_ROWS] for i in range(0, rows, CHUNK_ROWS)]


def stage_serial_or_pool(root: str, chunks, workers: int) -> float:
    t = time.perf_counter()
    n = sum(len(res) for _, res in _map_media(root, ["audio", "image"], iter(chunks), workers))
    return n / (time.perf_counter() - t)


def stage_ray(root: str, chunks, workers: int) -> float:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [{"row": r, "image": c["_cells"]["image"], "audio": c["_cells"]["audio"]} for ch in chunks for r, c in ch]

    def check(batch):
        cells = [{"image": i, "audio": a} for i, a in zip(batch["image"], batch["audio"])]
        res = check_media(root, cells)
        image, audio = np.empty(len(res), dtype=object), np.empty(len(res), dtype=object)
        image[:], audio[:] = [r["image"][0] for r in res], [r["audio"][0] for r in res]
        return {"row": batch["row"], "image": image, "audio": audio}  # the bytes travel back, as in the pool

    t = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(chunks))).map_batches(check, batch_size=CHUNK_ROWS)
    n = sum(len(b["row"]) for b in ds.iter_batches(batch_size=1024))
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--audio-format", choices=("wav", "flac"), default="wav")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ray", action="store_true", help="also time the media stage on Ray Data")
    p.add_argument("--on-ray", action="store_true", help="time serial prepare against prepare on a local Ray")
    p.add_argument("--chunk-rows", type=int, default=500, help="rows per Ray task with --on-ray")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="mmray-prepare-bench-")
    try:
        t = time.perf_counter()
        manifest = make_files(root, args.rows, args.image_size, args.image_format, args.audio_format)
        print(f"made {args.rows} rows of {args.image_size}px {args.image_format} + 1 s {args.audio_format} + caption in {time.perf_counter() - t:.0f} s; "
              f"{os.cpu_count()} CPUs, pool of {args.workers}")
        if args.on_ray:
            on_ray(manifest, root, args)
            return
        end_to_end(manifest, root, 1)  # warm-up: imports, page cache
        serial, pool = [], []
        for _ in range(args.rounds):
            serial.append(end_to_end(manifest, root, 1))
            pool.append(end_to_end(manifest, root, args.workers))
        (s, s_cpu, _), (q, q_cpu, q_parent) = np.mean(serial, axis=0), np.mean(pool, axis=0)
        print(f"end to end   serial {s:8.0f} rows/s   pool({args.workers}) {q:8.0f} rows/s   pool/serial {q / s:.2f}x")
        print(f"CPU per row  serial {s_cpu:8.2f} ms       pool({args.workers}) {q_cpu:8.2f} ms       "
              f"pool/serial {q_cpu / s_cpu:.2f}x (the pool's overhead; wall speed-up needs idle cores)")
        print(f"pool: {q_parent:.2f} ms per row in this process (manifest, writer), {q_cpu - q_parent:.2f} ms in the "
              f"workers: with idle cores the speed-up is bounded by {s_cpu / q_parent:.1f}x")
        print(f"load average during the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if args.ray:
            chunks = media_chunks(args.rows, args.image_format, args.audio_format)
            stage_ray(root, chunks, args.workers)  # warm-up: Ray start, workers
            res = {"serial": [], "pool": [], "ray": []}
            for _ in range(args.rounds):
                res["serial"].append(stage_serial_or_pool(root, chunks, 1))
                res["pool"].append(stage_serial_or_pool(root, chunks, args.workers))
                res["ray"].append(stage_ray(root, chunks, args.workers))
            m = {k: float(np.mean(v)) for k, v in res.items()}
            print(f"media stage  serial {m['serial']:8.0f} rows/s   pool({args.workers}) {m['pool']:8.0f} rows/s   "
                  f"ray data {m['ray']:8.0f} rows/s   pool/serial {m['pool'] / m['serial']:.2f}x   "
                  f"ray/pool {m['ray'] / m['pool']:.2f}x")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Compressed exports (`mmray export --quantize`): size on disk, CPU latency per sample and accuracy vs the original.

Copies MODEL_DIR into --work, writes its int8, fp16 and bf16 copies there with the library call that
`mmray export` makes, and measures every model on the same decoded rows of one split:

- size: bytes of model.safetensors and of the export folder;
- accuracy on the split, and the share of rows predicted like the original;
- CPU latency per sample of `Predictor.predict_batch` (decoding excluded) at batch 1 and batch --batch,
  median of --rounds rounds, in this thread's CPU time by default (--clock cpu, with one torch
  thread: the latency on an idle core, steady while other jobs share the machine); the models
  alternate inside each round so that every ratio compares measurements taken under the same load;
- an int8 copy with every linear layer on the int8 kernel (`min_kernel_elements=0`), next to the
  default that keeps layers under 512 x 512 weights in float32 compute;
- for the record, half-precision *compute* on CPU (the original's weights and inputs cast to bf16 /
  fp16, and bf16 autocast), which is why fp16/bf16 exports are widened to float32 at load.

Run (after `make quickstart`):
    .venv/bin/python benchmarks/quantize.py --model runs/quickstart/export --data data/synth --rounds 7 --layers
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from mmray.export import load_model
from mmray.export.codec import MODES
from mmray.export.compare import latency_ms
from mmray.export.evaluate import _batches
from mmray.export.quantize import folder_bytes, quantize_export


def _rows(batch: dict, n: int) -> dict:
    return {k: v[:n] for k, v in batch.items()}


class _HalfCompute:
    """The original predictor run with weights and floating inputs in ``dtype`` (or under autocast)."""

    def __init__(self, predictor, dtype: torch.dtype, autocast: bool):
        import copy

        self.p, self.dtype, self.autocast = predictor, dtype, autocast
        self.model = copy.deepcopy(predictor.model)
        if not autocast:
            self.model.to(dtype)

    def predict_batch(self, batch: dict) -> torch.Tensor:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not self.autocast:
            tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.dtype, enabled=self.autocast):
            return torch.softmax(self.model(tensors).logits["label"].float(), dim=-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/quickstart/export", help="a full-precision model export")
    ap.add_argument("--data", default="data/synth", help="its dataset directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--work", default="/tmp/mmray-bench-quantize", help="scratch folder for the copies")
    ap.add_argument("--batch", type=int, default=32, help="rows per batched call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="minimum time per latency measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (steady on a busy machine; needs --threads 1); wall: elapsed")
    ap.add_argument("--layers", action="store_true", help="also time single linear layers, float32 vs int8")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(args.model, work / "export", ignore=shutil.ignore_patterns("eval-*", "confusion-*", "compare-*"))
    dirs = {"original": work / "export"}
    for mode in MODES:
        t = time.perf_counter()
        res = quantize_export(work / "export", mode)
        dirs[mode] = Path(res["out"])
        print(f"{mode}: written in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    # the default int8 keeps narrow linear layers off the int8 kernel; this copy puts all of them on it
    res = quantize_export(work / "export", "int8", out=work / "export-int8-all-kernels", min_kernel_elements=0)
    dirs["int8, all linears on int8 kernels"] = Path(res["out"])
    models = {name: load_model(d) for name, d in dirs.items()}

    # Decode the split once; every model predicts the same tensors.
    batches = list(_batches(models["original"], args.data, args.split, 256))
    sample = _rows(batches[0], args.batch)
    preds = {}
    labels = torch.cat([b["label"][b["valid"].bool()] for b in batches])
    for name, m in models.items():
        preds[name] = torch.cat([m.predict_batch(b)[b["valid"].bool()].argmax(1) for b in batches])

    extra = {}
    for label, dtype, autocast in (("bf16 compute", torch.bfloat16, False), ("fp16 compute", torch.float16, False),
                                   ("bf16 autocast", torch.bfloat16, True)):
        try:
            h = _HalfCompute(models["original"], dtype, autocast)
            preds[label] = torch.cat([h.predict_batch(b)[b["valid"].bool()].argmax(1) for b in batches])
            extra[label] = h
        except Exception as e:  # noqa: BLE001 - recorded as "not supported" in the table
            print(f"{label}: fails on CPU: {type(e).__name__}: {e}", file=sys.stderr)

    timed = {**models, **extra}
    # torch runs on this thread alone (--threads 1), so its CPU time is the latency on an idle core
    clock = time.thread_time if args.clock == "cpu" and args.threads == 1 else time.perf_counter
    lat: dict[str, dict[int, list[float]]] = {n: {1: [], args.batch: []} for n in timed}
    for r in range(args.rounds):
        for name, m in timed.items():
            for n in (1, args.batch):
                lat[name][n].append(latency_ms(m, _rows(sample, n), min_seconds=args.seconds, clock=clock))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = {n: {b: statistics.median(v) for b, v in d.items()} for n, d in lat.items()}
    base_w = (dirs["original"] / "model.safetensors").stat().st_size
    base = med["original"]
    print(f"\nsplit {args.split}: {len(labels)} rows; torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds, {'thread CPU' if clock is time.thread_time else 'wall-clock'} time\n")
    print(f"| model | model.safetensors | vs original | export folder | accuracy | same prediction as original "
          f"| ms/sample batch 1 | speed-up | ms/sample batch {args.batch} | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in timed:
        acc = float((preds[name] == labels).float().mean())
        same = float((preds[name] == preds["original"]).float().mean())
        if name in dirs:
            w = (dirs[name] / "model.safetensors").stat().st_size
            size = f"{w / 1e3:,.0f} KB | {w / base_w:.2f}x | {folder_bytes(dirs[name]) / 1e3:,.0f} KB"
        else:
            size = "(in memory) | - | -"
        m = med[name]
        print(f"| {name} | {size} | {acc:.4f} | {same:.1%} | {m[1]:.3f} | {base[1] / m[1]:.2f}x "
              f"| {m[args.batch]:.3f} | {base[args.batch] / m[args.batch]:.2f}x |")
    if args.layers:
        _layers(args, clock)
    return 0


def _layers(args, clock) -> None:
    """One linear layer, float32 vs the int8 module `load_model` builds: where int8 compute pays off."""
    from mmray.export.codec import _replace_linear, quantize_weight_int8

    print("\n| linear layer (in x out) | batch | float32 us/call | int8 us/call | speed-up |")
    print("|---|---|---|---|---|")
    for d_in, d_out in ((64, 128), (192, 128), (256, 1024), (768, 3072)):
        holder = torch.nn.Module()
        holder.fc = torch.nn.Linear(d_in, d_out).eval()
        fp = holder.fc
        q, scale = quantize_weight_int8(fp.weight)
        _replace_linear(holder, "fc", q, scale, fp.bias.detach(), quantized_kernels=True)
        for b in (1, args.batch):
            x = torch.randn(b, d_in)
            times = {"fp": [], "q": []}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for key, mod in (("fp", fp), ("q", holder.fc)):
                        times[key].append(_us_per_call(mod, x, args.seconds / 5, clock))
            f, i = statistics.median(times["fp"]), statistics.median(times["q"])
            print(f"| {d_in} x {d_out} | {b} | {f:.1f} | {i:.1f} | {f / i:.2f}x |")


def _us_per_call(mod, x, seconds: float, clock) -> float:
    mod(x)
    n, start = 0, clock()
    while n < 20 or clock() - start < seconds:
        mod(x)
        n += 1
    return (clock() - start) / n * 1e6


if __name__ == "__main__":
    sys.exit(main())

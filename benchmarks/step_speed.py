"""Step speed: what NHWC convolutional encoders and fused optimizer steps save, measured in one run.

Run with:

    .venv/bin/python benchmarks/step_speed.py                 # one torch thread (a sweep slot's share)
    .venv/bin/python benchmarks/step_speed.py --threads 2

Two tables, each arm against its baseline in the same process, the best of ``--repeats`` interleaved rounds:

- **Encoders, NCHW vs NHWC** (``train.channels_last: off`` vs ``auto``): the CPU seconds of one forward + backward
  of each convolutional encoder of the zoo at a size a user would train it (random init, random inputs): ``cnn``
  at 32 px (the quickstart's) and 128 px (its defaults), ``resnet18`` at 224 px, ``mel_cnn`` on 1 s (the
  quickstart's) and 10 s of 16 kHz audio (its defaults).
- **Optimizer step, torch's default vs fused**: one AdamW step over the quickstart model's parameters, in
  mmray's parameter groups (per encoder, decay / no decay), with torch's CPU default (a Python loop over the
  parameters), ``foreach`` and ``fused`` (what mmray uses).

CPU time (``time.process_time``), so that other jobs on a shared box move the comparison less; with
``--threads 1`` one CPU second is one core's second.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from common import quickstart_model  # noqa: E402

from mmray.models.encoders import ENCODERS  # noqa: E402
from mmray.models.encoders.base import BuildContext  # noqa: E402

ENCODER_CASES = [  # (label, encoder name, build context, config keys, batch)
    ("cnn [16, 32, 64], 32 px, batch 32", "cnn", BuildContext(image_size=32),
     {"channels": [16, 32, 64], "dim": 64}, lambda: {"image": torch.randn(32, 3, 32, 32)}),
    ("cnn (defaults), 128 px, batch 16", "cnn", BuildContext(image_size=128), {},
     lambda: {"image": torch.randn(16, 3, 128, 128)}),
    ("resnet18, 224 px, batch 8", "resnet18", BuildContext(image_size=224, pretrained=False), {},
     lambda: {"image": torch.randn(8, 3, 224, 224)}),
    ("mel_cnn 32 mels [16, 32, 64], 1 s, batch 32", "mel_cnn", BuildContext(sample_rate=16000, audio_samples=16000),
     {"n_mels": 32, "channels": [16, 32, 64], "dim": 64}, lambda: {"audio": torch.randn(32, 16000)}),
    ("mel_cnn (defaults), 10 s, batch 8", "mel_cnn", BuildContext(sample_rate=16000, audio_samples=160000), {},
     lambda: {"audio": torch.randn(8, 160000)}),
]


def cpu_ms(fn, n: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e3


def encoder_step(name: str, ctx: BuildContext, keys: dict, make_batch, nhwc: bool):
    from mmray.train.device import is_convolutional

    torch.manual_seed(0)
    entry = ENCODERS.entry(name)
    encoder = entry.builder(entry.config(name=name, **keys), ctx)
    assert is_convolutional(encoder), name  # what train.channels_last: auto puts in NHWC
    batch = make_batch()
    if nhwc:
        encoder.to(memory_format=torch.channels_last)
        if "image" in batch:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    def step():
        encoder(batch).pooled.sum().backward()
    return step


def encoders_table(args) -> list[str]:
    lines = ["| encoder | NCHW, CPU ms a step | NHWC, CPU ms a step | NCHW / NHWC |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, name, ctx, keys, make_batch in ENCODER_CASES:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for nhwc in (False, True):
                best[nhwc] = min(best[nhwc], cpu_ms(encoder_step(name, ctx, keys, make_batch, nhwc), args.steps))
        lines.append(f"| {label} | {best[False]:.1f} | {best[True]:.1f} | **{best[False] / best[True]:.2f}x** |")
        print(lines[-1], flush=True)
    return lines


def optimizer_table(args) -> list[str]:
    from mmray.config import validate_job
    from mmray.models.builder import build_job_model
    from mmray.train.loop import make_optimizer, param_groups

    config = validate_job({
        "name": "step-speed", "data": {"path": "unused", "modalities": ["audio", "image", "text"]},
        "model": quickstart_model(),
        "train": {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}},
    })
    class Vocabulary:  # all the text encoder needs of a tokenizer
        vocab_size, pad_id = 1000, 0

    model = build_job_model(config, {"label": 10}, Vocabulary())
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    arms = {"torch's CPU default (a loop over the parameters)": {"foreach": False},
            "foreach": {"foreach": True}, "fused (mmray)": {"fused": True}}
    best = dict.fromkeys(arms, float("inf"))
    for _ in range(args.repeats):
        for arm, options in arms.items():
            optimizer = make_optimizer(config.train.optimizer, param_groups(model, config))
            for group in optimizer.param_groups:  # the same groups, the kernel switched
                group.update(fused=options.get("fused", False), foreach=options.get("foreach"))
            best[arm] = min(best[arm], cpu_ms(optimizer.step, args.steps * 20))
    base = best["torch's CPU default (a loop over the parameters)"]
    lines = [f"AdamW over the quickstart model's {sum(p.numel() for p in params):,} parameters in "
             f"{len(make_optimizer(config.train.optimizer, param_groups(model, config)).param_groups)} groups:", "",
             "| step | CPU ms | vs torch's default |", "|---|---|---|"]
    lines += [f"| {arm} | {ms:.3f} | {base / ms:.2f}x |" for arm, ms in best.items()]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of them is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    head = (f"threads={args.threads} cpus={os.cpu_count()} cpu={platform.processor() or platform.machine()} "
            f"torch={torch.__version__} python={platform.python_version()} load_avg_1m={os.getloadavg()[0]:.1f}")
    print(head + "\n", flush=True)
    encoders_table(args)  # prints its rows as they are measured
    print("\n" + "\n".join(optimizer_table(args)))


if __name__ == "__main__":
    main()

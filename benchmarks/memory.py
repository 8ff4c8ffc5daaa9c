"""Memory and step time of fine-tuning big pretrained encoders: full fine-tuning, LoRA, activation checkpointing.

Run with:

    .venv/bin/python benchmarks/memory.py                          # ViT-Base + BERT-base sized (~196M params)
    .venv/bin/python benchmarks/memory.py --size vit-small         # 6 layers of 384 (~33M params), 224 px
    .venv/bin/python benchmarks/memory.py --size small --steps 2   # a quick smoke run of the same code
    .venv/bin/python benchmarks/memory.py --size vit-small --variants "DDP, 2 workers,FSDP, 2 workers"

The model is mmray's own (:func:`mmray.models.builder.build_job_model`): an ``hf_image`` ViT and an ``hf_text``
BERT, random weights built from their config classes (``--size base``: ViT-Base/16 at 224 px and BERT-base,
the sizes of the usual released checkpoints) and saved to a temporary folder as a user's model folders would
be, concat fusion, AdamW, one fixed batch. Each variant runs in a fresh process (so one variant's freed
memory cannot hide another's) and reports, per worker:

- ``weights`` / ``grads`` / ``optimizer``: bytes of the parameters, of the gradients of the trainable ones,
  and of AdamW's state after a step;
- ``activations``: how far resident memory rose during the forward pass and stayed until the backward (what
  autograd keeps for it; the median over the timed steps);
- ``step peak``: how far the process's resident memory rises above its resting size during one training
  step (forward + backward + optimizer step: activations, gradients and temporaries), from Linux's peak-RSS
  counter (``VmHWM``, reset before the step through ``/proc/self/clear_refs``);
- ``training memory`` = resting weights + optimizer state + step peak: what a worker needs beyond Python and
  torch themselves; ``ratio`` is to full fine-tuning in the same run;
- ``step s``: median wall time of ``--steps`` steps after one warm-up step.

CPU only (fp32). On a GPU the same split holds, with ``torch.cuda.max_memory_allocated`` as the counter.

The ``..., 2 workers`` variants (``scaling.strategy`` ddp or fsdp) run the same model and batch on two processes
of a gloo group, wrapped as the training loop wraps it (DDP; or :func:`mmray.train.sharding.shard_model`), and
report the larger of the two ranks' figures, per rank: ``weights`` / ``grads`` / ``optimizer`` are what the rank
holds (its shards under FSDP), and ``training memory`` is the rank's peak resident memory during a step minus
its resident memory before the model was built, with the libraries imported (so DDP's gradient buckets and
FSDP's gathered blocks count);
their ``ratio`` is to the DDP row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {
    # hidden, layers, heads, mlp, image size, patch, text length
    "base": dict(hidden=768, layers=12, heads=12, mlp=3072, image=224, patch=16, text=64),
    "vit-small": dict(hidden=384, layers=6, heads=6, mlp=1536, image=224, patch=16, text=64),
    "small": dict(hidden=128, layers=2, heads=2, mlp=256, image=64, patch=16, text=16),
}
VARIANTS = {
    "full fine-tuning": {},
    "LoRA (rank 8)": {"lora": {"rank": 8}},
    "activation checkpointing": {"gradient_checkpointing": True},
    "LoRA + checkpointing": {"lora": {"rank": 8}, "gradient_checkpointing": True},
}
# scaling.strategy on two workers (a gloo group of two processes), with the encoder keys of the variant
GROUP_VARIANTS = {
    "DDP, 2 workers": ("ddp", {}),
    "FSDP, 2 workers": ("fsdp", {}),
    "FSDP + LoRA + checkpointing, 2 workers": ("fsdp", {"lora": {"rank": 8}, "gradient_checkpointing": True}),
}
WORKERS = 2


def save_models(root: str, size: dict) -> tuple[str, str]:
    import torch
    import transformers as t

    torch.manual_seed(0)
    vit, bert = os.path.join(root, "vit"), os.path.join(root, "bert")
    t.ViTModel(t.ViTConfig(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                           num_attention_heads=size["heads"], intermediate_size=size["mlp"],
                           image_size=size["image"], patch_size=size["patch"])).save_pretrained(vit)
    t.ViTImageProcessor(size={"height": size["image"], "width": size["image"]}).save_pretrained(vit)
    t.BertModel(t.BertConfig(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                             num_attention_heads=size["heads"], intermediate_size=size["mlp"])).save_pretrained(bert)
    return vit, bert


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _job(vit: str, bert: str, keys: dict, size: dict):
    from mmray.config import validate_job

    return validate_job({
        "name": "memory", "data": {"path": "unused", "modalities": ["image", "text"],
                                   "text": {"max_length": size["text"]}},
        "model": {"encoders": {"image": {"name": "hf_image", "path": vit, **keys},
                               "text": {"name": "hf_text", "path": bert, **keys}},
                  "fusion": {"name": "concat", "hidden_dim": 256}},
        "train": {"optimizer": {"name": "adamw", "lr": 1e-4}},
    })


def _model(config):
    from mmray.models.builder import build_job_model

    class Tok:  # the model's vocabulary size is all the builder reads from a tokenizer
        vocab_size, pad_id = 30522, 0

    return build_job_model(config, {"label": 10}, Tok())


def _batch(size: dict, batch: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch, 3, size["image"], size["image"], generator=g),
        "input_ids": torch.randint(1, 30522, (batch, size["text"]), generator=g),
        "attention_mask": torch.ones(batch, size["text"], dtype=torch.long),
        "image_present": torch.ones(batch, dtype=torch.bool), "text_present": torch.ones(batch, dtype=torch.bool),
        "label": torch.randint(0, 10, (batch,), generator=g),
    }


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _timed_steps(model, optimizer, data: dict, steps: int) -> dict:
    """One warm-up step, then ``steps`` timed ones: activations kept, step peak and time (medians / max)."""
    import torch

    def step() -> int:
        """One training step; returns the bytes the forward pass left resident for the backward."""
        before = _kib("VmRSS")
        loss = torch.nn.functional.cross_entropy(model(data).logits["label"], data["label"])
        kept = _kib("VmRSS") - before
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return kept

    step()  # warm-up: AdamW's state exists from here on
    times, peaks, kept, highs = [], [], [], []
    for _ in range(steps):
        resting = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        kept.append(step())
        times.append(time.perf_counter() - start)
        highs.append(_kib("VmHWM"))
        peaks.append(highs[-1] - resting)
    return {"step_peak": max(peaks), "activations": statistics.median(kept), "step_s": statistics.median(times),
            "high": max(highs)}


def _held(model, optimizer) -> dict:
    import torch

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
        "weights": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p) for p in trainable),
        "optimizer": sum(_local_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
    }


def measure(vit: str, bert: str, variant: str, size: dict, batch: int, steps: int) -> dict:
    """One variant, in this process: the figures listed in the module docstring."""
    import torch

    from mmray.train.loop import make_optimizer, param_groups

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = _job(vit, bert, VARIANTS[variant], size)
    model = _model(config)
    model.train()
    optimizer = make_optimizer(config.train.optimizer, param_groups(model, config))
    timed = _timed_steps(model, optimizer, _batch(size, batch), steps)
    held = _held(model, optimizer)
    return {**held, **timed, "training": held["weights"] + held["optimizer"] + timed["step_peak"]}


def _rank(rank: int, port: int, vit: str, bert: str, variant: str, size: dict, batch: int, steps: int,
          out: str) -> None:
    """One rank of a 2-worker variant: wrapped as the loop wraps it; its figures to ``out``.rank."""
    import torch
    import torch.distributed as dist

    from mmray.train.checkpoint import unwrap
    from mmray.train.loop import make_optimizer, param_groups
    from mmray.train.sharding import shard_model

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        strategy, keys = GROUP_VARIANTS[variant]
        _import_model_code(keys)
        baseline = _kib("VmRSS")  # the libraries and the process group, before any weight exists
        config = _job(vit, bert, keys, size)
        torch.manual_seed(rank)
        model = _model(config)
        model.train()
        param_groups(model, config)  # freezes the LoRA bases before the wrap, as the loop does
        if strategy == "fsdp":
            model = shard_model(model, "fp32", torch.device("cpu"))
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = make_optimizer(config.train.optimizer, param_groups(unwrap(model), config))
        timed = _timed_steps(model, optimizer, _batch(size, batch), steps)
        held = _held(model, optimizer)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({**held, **timed, "training": timed["high"] - baseline}, f)
    finally:
        dist.destroy_process_group()


def _import_model_code(keys: dict) -> None:
    """Import every module building and running the model needs, so the baseline holds the code, not the weights."""
    import importlib

    for name in ("mmray.models.builder", "mmray.models.encoders.hf", "transformers.models.vit.modeling_vit",
                 "transformers.models.bert.modeling_bert", "torch.distributed.fsdp", "torch.distributed.tensor",
                 *(["peft"] if "lora" in keys else [])):
        importlib.import_module(name)


def measure_group(vit: str, bert: str, variant: str, size: dict, batch: int, steps: int) -> dict:
    """A 2-worker variant: the larger of the two ranks' figures (params: the whole model's)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="mmray-memory-rank-") as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_rank, args=(port, vit, bert, variant, size, batch, steps, out), nprocs=WORKERS)
        ranks = [json.load(open(f"{out}.{r}")) for r in range(WORKERS)]
    merged = {k: max(r[k] for r in ranks) for k in ranks[0]}
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of: {', '.join([*VARIANTS, *GROUP_VARIANTS])}")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant, print JSON
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = SIZES[args.size]
    if args.one:
        vit, bert = args.models.split(",")
        how = measure_group if args.one in GROUP_VARIANTS else measure
        print(json.dumps(how(vit, bert, args.one, size, args.batch_size, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="mmray-memory-") as root:
        vit, bert = save_models(root, size)
        rows = {}
        for variant in _variants(args.variants):
            # A fixed mmap threshold: glibc returns every freed tensor's pages at once, so RSS follows live memory.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run([sys.executable, __file__, "--one", variant, "--models", f"{vit},{bert}",
                                  "--size", args.size, "--batch-size", str(args.batch_size),
                                  "--steps", str(args.steps)], check=True, capture_output=True, text=True, env=env)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant}: done", file=sys.stderr)
    full = rows.get("full fine-tuning")
    ddp = rows.get("DDP, 2 workers")
    mb = 1 << 20
    print(f"\nsize {args.size}, batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPUs\n")
    print("| variant | params | trainable | weights MB | grads MB | optimizer MB | activations MB | step peak MB "
          "| training memory MB | ratio | step s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, r in rows.items():
        base = ddp if variant in GROUP_VARIANTS else full
        ratio = f"{r['training'] / base['training']:.2f}x" if base else "-"
        tratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        print(f"| {variant} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e6:.2f}M | {r['weights'] / mb:,.0f} "
              f"| {r['grads'] / mb:,.0f} | {r['optimizer'] / mb:,.0f} | {r['activations'] / mb:,.0f} "
              f"| {r['step_peak'] / mb:,.0f} "
              f"| {r['training'] / mb:,.0f} | {ratio} | {r['step_s']:.2f} | {tratio} |")


def _variants(text: str) -> list[str]:
    """The variants named in ``text`` (comma-separated; a group variant's own comma is part of its name)."""
    names = [*GROUP_VARIANTS, *VARIANTS]
    out = []
    while text:
        name = next((n for n in names if text.startswith(n)), None)
        if name is None:
            raise SystemExit(f"--variants: {text.split(',')[0]!r} is not one of {names}")
        out.append(name)
        text = text[len(name):].lstrip(",")
    return out


if __name__ == "__main__":
    main()

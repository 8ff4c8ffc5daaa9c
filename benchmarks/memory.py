"""Memory and step time of fine-tuning big pretrained encoders: full fine-tuning, LoRA, activation checkpointing.

Run with:

    .venv/bin/python benchmarks/memory.py                          # ViT-Base + BERT-base sized (~196M params)
    .venv/bin/python benchmarks/memory.py --size vit-small         # 6 layers of 384 (~33M params), 224 px
    .venv/bin/python benchmarks/memory.py --size small --steps 2   # a quick smoke run of the same code

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


def measure(vit: str, bert: str, variant: str, size: dict, batch: int, steps: int) -> dict:
    """One variant, in this process: the figures listed in the module docstring."""
    import torch

    from mmray.config import validate_job
    from mmray.models.builder import build_job_model
    from mmray.train.loop import make_optimizer, param_groups

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    keys = VARIANTS[variant]
    config = validate_job({
        "name": "memory", "data": {"path": "unused", "modalities": ["image", "text"],
                                   "text": {"max_length": size["text"]}},
        "model": {"encoders": {"image": {"name": "hf_image", "path": vit, **keys},
                               "text": {"name": "hf_text", "path": bert, **keys}},
                  "fusion": {"name": "concat", "hidden_dim": 256}},
        "train": {"optimizer": {"name": "adamw", "lr": 1e-4}},
    })

    class Tok:  # the model's vocabulary size is all the builder reads from a tokenizer
        vocab_size, pad_id = 30522, 0

    model = build_job_model(config, {"label": 10}, Tok())
    model.train()
    optimizer = make_optimizer(config.train.optimizer, param_groups(model, config))
    g = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 3, size["image"], size["image"], generator=g),
        "input_ids": torch.randint(1, 30522, (batch, size["text"]), generator=g),
        "attention_mask": torch.ones(batch, size["text"], dtype=torch.long),
        "image_present": torch.ones(batch, dtype=torch.bool), "text_present": torch.ones(batch, dtype=torch.bool),
        "label": torch.randint(0, 10, (batch,), generator=g),
    }

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
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
    times, peaks, kept = [], [], []
    for _ in range(steps):
        resting = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        kept.append(step())
        times.append(time.perf_counter() - start)
        peaks.append(_kib("VmHWM") - resting)
    weights = sum(p.numel() * p.element_size() for p in params)
    return {
        "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
        "weights": weights, "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": optimizer_bytes, "step_peak": max(peaks), "activations": statistics.median(kept),
        "training": weights + optimizer_bytes + max(peaks), "step_s": statistics.median(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant, print JSON
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = SIZES[args.size]
    if args.one:
        vit, bert = args.models.split(",")
        print(json.dumps(measure(vit, bert, args.one, size, args.batch_size, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="mmray-memory-") as root:
        vit, bert = save_models(root, size)
        rows = {}
        for variant in args.variants.split(","):
            # A fixed mmap threshold: glibc returns every freed tensor's pages at once, so RSS follows live memory.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run([sys.executable, __file__, "--one", variant, "--models", f"{vit},{bert}",
                                  "--size", args.size, "--batch-size", str(args.batch_size),
                                  "--steps", str(args.steps)], check=True, capture_output=True, text=True, env=env)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{variant}: done", file=sys.stderr)
    full = rows.get("full fine-tuning")
    mb = 1 << 20
    print(f"\nsize {args.size}, batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPUs\n")
    print("| variant | params | trainable | weights MB | grads MB | optimizer MB | activations MB | step peak MB "
          "| training memory MB | ratio | step s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, r in rows.items():
        ratio = f"{r['training'] / full['training']:.2f}x" if full else "-"
        tratio = f"{r['step_s'] / full['step_s']:.2f}x" if full else "-"
        print(f"| {variant} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e6:.2f}M | {r['weights'] / mb:,.0f} "
              f"| {r['grads'] / mb:,.0f} | {r['optimizer'] / mb:,.0f} | {r['activations'] / mb:,.0f} "
              f"| {r['step_peak'] / mb:,.0f} "
              f"| {r['training'] / mb:,.0f} | {ratio} | {r['step_s']:.2f} | {tratio} |")


if __name__ == "__main__":
    main()

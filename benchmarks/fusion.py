"""Fusion benchmark: every registered fusion (all three modalities) vs each modality alone, same budget.

Run with:

    .venv/bin/python benchmarks/fusion.py                                  # 2,000 synth rows, 6 epochs
    .venv/bin/python benchmarks/fusion.py --rows 600 --epochs 2            # a quick smoke run
    .venv/bin/python benchmarks/fusion.py --only attention,tensor          # a subset of fusions
    .venv/bin/python benchmarks/fusion.py --results benchmarks/RESULTS.md  # also append the table there

Every model trains in-process with :func:`mmray.train.local.train_local` (the same loop as under Ray, no
Ray) on the built-in dataset, with the same small encoders, epochs, batch size, learning rate and seed;
each fusion uses its own config defaults. Reported per model: the best validation accuracy
(``state.best_value``), the macro-F1 of that epoch, the parameter count, the end-to-end training
throughput (``train.samples_per_s``, decode included, mean over epochs after the first) and the model's own step time
(forward + backward + AdamW step on one fixed decoded batch, median; measured for all models
interleaved in the same rounds, so a busy shared CPU slows them alike).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmray.config import JobConfig, validate_job  # noqa: E402
from mmray.data.dataset_dir import read_dataset_info  # noqa: E402
from mmray.data.reader import iter_batches  # noqa: E402
from mmray.data.synth import synth  # noqa: E402
from mmray.data.tokenizer import TextTokenizer  # noqa: E402
from mmray.models.builder import build_job_model, job_tasks  # noqa: E402
from mmray.models.fusion import FUSIONS  # noqa: E402
from mmray.train.local import train_local  # noqa: E402

MODALITIES = ("audio", "image", "text")
# The encoders of tests/helpers.py: the built-in task is learnable in a few epochs on 2 CPU cores.
ENCODERS = {
    "image": {"name": "cnn", "channels": [16, 32, 64], "dim": 64},
    "text": {"name": "transformer", "dim": 64, "layers": 1, "heads": 4, "ff_dim": 128},
    "audio": {"name": "mel_cnn", "n_mels": 32, "channels": [16, 32, 64], "dim": 64},
}
SECTION = "## Fusion methods (issue: fusion and encoder zoo)"


def job(data: str, fusion: str, modalities, args) -> JobConfig:
    return validate_job({
        "name": f"bench-{fusion}-{'-'.join(modalities)}",
        "data": {"path": data, "modalities": list(modalities)},
        "model": {"encoders": ENCODERS, "fusion": {"name": fusion}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                  "optimizer": {"lr": args.lr}, "early_stopping": {"patience": None}},
    })


def train_one(config: JobConfig, run_dir: str) -> dict:
    state, _ = train_local(config, run_dir)
    best = state.history[state.best_epoch - 1]
    return {"acc": state.best_value, "f1": best["val.f1"], "best_epoch": state.best_epoch,
            # The first epoch carries one-time costs (lazy imports, allocator warm-up): leave it out.
            "rows_per_s": statistics.mean(h["train.samples_per_s"] for h in state.history[1:] or state.history)}


def step_times(configs: dict[str, JobConfig], *, steps: int, rounds: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median ms per optimizer step and parameter count of each model, timed round-robin on one batch."""
    first = next(iter(configs.values()))
    info = read_dataset_info(first.data.path)
    tokenizer = TextTokenizer.load(first.data.text, info)
    tasks = job_tasks(info.tasks)
    batch = next(iter(iter_batches(first.data, info, "train", batch_size=first.train.batch_size, train=True)))
    models, opts, times = {}, {}, {k: [] for k in configs}
    for key, config in configs.items():
        torch.manual_seed(0)
        models[key] = build_job_model(config, tasks, tokenizer).train()
        opts[key] = torch.optim.AdamW(models[key].parameters(), lr=config.train.optimizer.lr)

    def step(key: str) -> None:
        opts[key].zero_grad(set_to_none=True)
        F.cross_entropy(models[key](batch).logits["label"], batch["label"]).backward()
        opts[key].step()

    for key in configs:  # warm-up: allocator, lazy init
        step(key)
    for _ in range(rounds):
        for key in configs:
            start = time.perf_counter()
            for _ in range(steps):
                step(key)
            times[key].append((time.perf_counter() - start) / steps * 1e3)
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    return {k: statistics.median(v) for k, v in times.items()}, params


def table(rows: list[dict]) -> str:
    lines = ["| model | modalities | val accuracy | val macro-F1 | best epoch | params | step ms | train rows/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['modalities']} | {r['acc']:.3f} | {r['f1']:.3f} | {r['best_epoch']} | "
                     f"{r['params']:,} | {r['step_ms']:.1f} | {r['rows_per_s']:.0f} |")
    return "\n".join(lines)


def append_section(path: str, body: str) -> None:
    """Append (or replace) this benchmark's section of ``path``; other sections are kept as they are."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start].rstrip("\n") + ("\n\n" + text[nxt + 1:] if nxt != -1 else "")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset directory; default: synth --rows ROWS into a temp dir")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma-separated fusions (default: every registered one)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-modality baselines")
    ap.add_argument("--step-rounds", type=int, default=5, help="rounds of step timing (all models per round)")
    ap.add_argument("--results", help="append the table as a section of this Markdown file")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="mmray-fusion-bench-")
    data = args.data or synth(os.path.join(tmp, "synth"), rows=args.rows, shards=2, seed=0).path
    fusions = args.only.split(",") if args.only else FUSIONS.names()
    runs = {f: (f, MODALITIES) for f in fusions}
    if not args.no_single:
        runs |= {f"{m} only": ("concat", (m,)) for m in MODALITIES}
    configs = {key: job(data, fusion, mods, args) for key, (fusion, mods) in runs.items()}

    results = []
    for key, config in configs.items():
        start = time.perf_counter()
        r = train_one(config, os.path.join(tmp, "runs", key.replace(" ", "-")))
        print(f"{key:>16}: val acc {r['acc']:.3f}  f1 {r['f1']:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        results.append({"label": key, "modalities": "+".join(config.data.modalities), **r})
    ms, params = step_times(configs, steps=5, rounds=args.step_rounds)
    for r in results:
        r["step_ms"], r["params"] = ms[r["label"]], params[r["label"]]

    info = read_dataset_info(data)
    cmd = " ".join([".venv/bin/python benchmarks/fusion.py", *(argv if argv is not None else sys.argv[1:])])
    body = "\n".join([
        SECTION, "",
        f"**Command:** `{cmd}`", "",
        f"**Machine:** {os.cpu_count()} CPU cores (shared with other jobs), no GPU; torch {torch.__version__}, "
        f"Python {platform.python_version()}.", "",
        f"**Budget (every model):** built-in data `synth(rows={info.splits['train'].rows + info.splits['val'].rows + info.splits['test'].rows}, "
        f"shards=2, seed=0)` ({info.splits['train'].rows} train / {info.splits['val'].rows} val rows), "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} (cosine, 5 % warm-up), seed {args.seed}, "
        "no early stopping; encoders as in `tests/helpers.py` (64-wide CNN / 1-layer transformer / mel-CNN); "
        "each fusion with its config defaults; single modalities use `concat`.", "",
        table(results), "",
        "val accuracy = best epoch's (`state.best_value`); macro-F1 of that epoch; params = trainable, whole model; "
        "step ms = forward + backward + AdamW on one decoded batch, median of the rounds, all models timed "
        "round-robin in one process; train rows/s = `train.samples_per_s` (in-process decode included), mean over epochs 2+.",
    ])
    print("\n" + body)
    if args.results:
        append_section(args.results, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

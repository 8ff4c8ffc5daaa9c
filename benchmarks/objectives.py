"""Cost (and effect) of the auxiliary objectives: contrastive (InfoNCE) and adversarial (FGSM / PGD) training.

Run with:

    .venv/bin/python benchmarks/objectives.py                     # step times only (a minute)
    .venv/bin/python benchmarks/objectives.py --train --epochs 4  # also train each variant on the built-in data

Step time = forward + every loss term + backward + AdamW step on one fixed decoded batch of the quickstart-sized
model (concat fusion), median over rounds in which every variant runs once (interleaved, so a busy shared CPU
slows them alike), printed as a ratio to the plain supervised step measured in the same run. With ``--train``,
each variant trains in-process (:func:`mmray.train.local.train_local`, the loop used under Ray) with the same
seed and budget and its best validation accuracy is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mmray.config import validate_job  # noqa: E402
from mmray.data.dataset_dir import read_dataset_info  # noqa: E402
from mmray.data.reader import iter_batches  # noqa: E402
from mmray.data.synth import synth  # noqa: E402
from mmray.data.tokenizer import TextTokenizer  # noqa: E402
from mmray.models.builder import build_job_model, job_tasks  # noqa: E402
from mmray.train.local import train_local  # noqa: E402
from mmray.train.loop import make_optimizer, param_groups, task_losses  # noqa: E402
from mmray.train.objectives import step_losses  # noqa: E402

ENCODERS = {
    "image": {"name": "cnn", "channels": [16, 32, 64], "dim": 64},
    "text": {"name": "transformer", "dim": 64, "layers": 1, "heads": 4, "ff_dim": 128},
    "audio": {"name": "mel_cnn", "n_mels": 32, "channels": [16, 32, 64], "dim": 64},
}
VARIANTS = {
    "supervised (baseline)": {},
    "contrastive weight 0.1": {"contrastive": {"weight": 0.1}},
    "contrastive pretraining epoch": {"contrastive": {"pretrain_epochs": 1}},
    "fgsm eps 0.05": {"adversarial": {"method": "fgsm", "epsilon": 0.05}},
    "pgd eps 0.05, 3 steps": {"adversarial": {"method": "pgd", "epsilon": 0.05, "steps": 3}},
}


def job(data: str, train: dict, args):
    return validate_job({
        "name": "bench-objectives", "data": {"path": data},
        "model": {"encoders": ENCODERS, "fusion": {"name": "concat", "hidden_dim": 128}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "optimizer": {"lr": 3e-3},
                  "early_stopping": {"patience": None}, **train},
    })


def step_times(data: str, args) -> dict[str, float]:
    info = read_dataset_info(data)
    setups = {}
    for name, train in VARIANTS.items():
        config = job(data, train, args)
        torch.manual_seed(0)
        model = build_job_model(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)).train()
        opt = make_optimizer(config.train.optimizer, param_groups(model, config))
        setups[name] = (config, model, opt)
    batch = next(iter_batches(config.data, info, "train", batch_size=args.batch_size, train=False))
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for _ in range(args.rounds):
        for name, (config, model, opt) in setups.items():
            t = time.perf_counter()
            parts = step_losses(model, model(batch), batch, lambda lg: task_losses(lg, batch, 0.0), config, epoch=1)
            parts["total"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
    return {n: statistics.median(v[1:]) for n, v in times.items()}  # the first round warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--train", action="store_true", help="also train every variant and report val accuracy")
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="mmray-bench-objectives-")
    data = os.path.join(tmp, "synth")
    synth(data, rows=args.rows, shards=2, seed=0)
    times = step_times(data, args)
    base = times["supervised (baseline)"]
    print(f"| objective | step ms (batch {args.batch_size}) | x baseline |" + (" best val acc |" if args.train else ""))
    print("|---|---|---|" + ("---|" if args.train else ""))
    for i, (name, t) in enumerate(times.items()):
        row = f"| {name} | {t * 1000:.1f} | {t / base:.2f} |"
        if args.train:
            train = dict(VARIANTS[name])
            if "pretrain_epochs" in train.get("contrastive", {}):
                train = {"contrastive": {"pretrain_epochs": 1, "weight": 0.1}}
            state, _ = train_local(job(data, train, args), os.path.join(tmp, f"run-{i}"))
            row += f" {state.best_value:.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""The reference arm: the single-file PyTorch (+ Optuna) script a user would write for an mmray dataset directory.

    python benchmarks/suite/reference.py data/suite/spoken-digits                       # one run, 20 epochs
    python benchmarks/suite/reference.py data/suite/spoken-digits --optuna-trials 16    # its own Optuna study

It uses nothing from mmray: it reads ``dataset.json`` and the Parquet shards of train/val/test with pyarrow,
decodes every file once into memory (PNG -> 32x32 RGB; WAV -> 1 s at 16 kHz -> 40-band log-mel, standardised
per recording; text -> lower-case words -> a vocabulary of the training words seen twice or more), and trains
a fixed small concat model: a 3-layer CNN per image and per log-mel, a mean embedding bag over the words,
each modality's 64-d feature zeroed when the row lacks it plus one "present" flag per modality, then
dropout -> 128 -> classes. AdamW, cosine learning rate, batch 64, ``--epochs`` epochs; the reported test
accuracy is the one at the best validation epoch. ``--optuna-trials K`` runs a TPE study over learning rate,
weight decay and dropout (its first trial is the defaults) and reports the best trial.

One torch thread by default (``--threads``), so it can be compared with one mmray worker. The last line is
``RESULT {json}``: val/test accuracy, seconds (decode included), and the (seconds, val accuracy) curve.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from torch import nn

SR, IMG, N_MELS, MAX_WORDS, DIM = 16000, 32, 40, 64, 64
WORD = re.compile(r"[a-z0-9']+")


# ----------------------------------------------------------------------------- data, decoded once
def read_split(data: str, split: str) -> dict[str, list]:
    files = sorted(glob.glob(os.path.join(data, split, "*.parquet")))
    tables = [pq.read_table(f) for f in files]
    out: dict[str, list] = {}
    for t in tables:
        for name in t.column_names:
            out.setdefault(name, []).extend(t.column(name).to_pylist())
    return out


def decode_images(cells: list) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(cells), 3, IMG, IMG)
    present = torch.zeros(len(cells))
    for i, b in enumerate(cells):
        if b is None:
            continue
        im = Image.open(io.BytesIO(b)).convert("RGB").resize((IMG, IMG), Image.BILINEAR)
        x[i] = (torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.25
        present[i] = 1
    return x, present


MEL = torchaudio.transforms.MelSpectrogram(SR, n_fft=512, hop_length=160, n_mels=N_MELS)


def decode_audio(cells: list) -> tuple[torch.Tensor, torch.Tensor]:
    frames = SR // 160 + 1
    x = torch.zeros(len(cells), 1, N_MELS, frames)
    present = torch.zeros(len(cells))
    for i, b in enumerate(cells):
        if b is None:
            continue
        wav, sr = sf.read(io.BytesIO(b), dtype="float32", always_2d=True)
        w = torch.from_numpy(wav.mean(axis=1))
        if sr != SR:
            w = torchaudio.functional.resample(w, sr, SR)
        w = F.pad(w[:SR], (0, max(0, SR - len(w))))
        m = torch.log(MEL(w) + 1e-6)
        x[i, 0] = (m - m.mean()) / (m.std() + 1e-5)  # per recording: a quiet file looks like a loud one
        present[i] = 1
    return x, present


def words(text: str | None) -> list[str]:
    return WORD.findall(text.lower()) if text else []


def build_vocab(texts: list) -> dict[str, int]:
    counts = Counter(w for t in texts for w in words(t))
    return {w: i + 1 for i, w in enumerate(sorted(w for w, c in counts.items() if c >= 2))}  # 0 = padding


def encode_texts(texts: list, vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(texts), MAX_WORDS, dtype=torch.long)
    present = torch.zeros(len(texts))
    for i, t in enumerate(texts):
        ids = [vocab[w] for w in words(t) if w in vocab][:MAX_WORDS]
        if t:
            present[i] = 1
        if ids:
            x[i, :len(ids)] = torch.tensor(ids)
    return x, present


def load(data: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]], int]:
    with open(os.path.join(data, "dataset.json")) as f:
        info = json.load(f)
    raw = {s: read_split(data, s) for s in ("train", "val", "test")}
    vocab = build_vocab(raw["train"]["text"]) if "text" in info["modalities"] else {}
    splits = {}
    for s, cols in raw.items():
        t: dict[str, torch.Tensor] = {"label": torch.tensor(cols["label"], dtype=torch.long)}
        if "image" in info["modalities"]:
            t["image"], t["image_present"] = decode_images(cols["image"])
        if "audio" in info["modalities"]:
            t["audio"], t["audio_present"] = decode_audio(cols["audio"])
        if "text" in info["modalities"]:
            t["text"], t["text_present"] = encode_texts(cols["text"], vocab)
        splits[s] = t
    return info, splits, len(vocab) + 1


# ----------------------------------------------------------------------------- model
def small_cnn(in_ch: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in ((in_ch, 16), (16, 32), (32, DIM)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ConcatNet(nn.Module):
    def __init__(self, modalities: list[str], vocab_size: int, classes: int, dropout: float):
        super().__init__()
        self.modalities = sorted(modalities)
        self.enc = nn.ModuleDict()
        if "image" in modalities:
            self.enc["image"] = small_cnn(3)
        if "audio" in modalities:
            self.enc["audio"] = small_cnn(1)
        if "text" in modalities:
            self.enc["text"] = nn.EmbeddingBag(vocab_size, DIM, mode="mean", padding_idx=0)
        width = len(self.modalities) * (DIM + 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 128), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(128, classes))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        for m in self.modalities:
            p = batch[f"{m}_present"].unsqueeze(1)
            feats += [self.enc[m](batch[m]) * p, p]
        return self.head(torch.cat(feats, dim=1))


# ----------------------------------------------------------------------------- training
def batches(t: dict[str, torch.Tensor], size: int, order: torch.Tensor):
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield {k: v[idx] for k, v in t.items()}


@torch.no_grad()
def accuracy(model: nn.Module, t: dict[str, torch.Tensor]) -> float:
    model.eval()
    right = 0
    for b in batches(t, 256, torch.arange(len(t["label"]))):
        right += int((model(b).argmax(1) == b["label"]).sum())
    return right / max(1, len(t["label"]))


def train(info: dict, splits: dict, vocab_size: int, *, lr: float, weight_decay: float, dropout: float,
          epochs: int, batch_size: int, seed: int, t0: float, curve: list, log=print) -> dict[str, float]:
    torch.manual_seed(seed)
    model = ConcatNet(info["modalities"], vocab_size, len(info["class_names"]), dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    tr = splits["train"]
    steps = epochs * math.ceil(len(tr["label"]) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05,
                                                anneal_strategy="cos")
    best = {"val_accuracy": -1.0, "test_accuracy": 0.0, "epoch": 0}
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for b in batches(tr, batch_size, torch.randperm(len(tr["label"]), generator=g)):
            loss = F.cross_entropy(model(b), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, splits["val"])
        curve.append((time.time() - t0, val))
        if val > best["val_accuracy"]:
            best = {"val_accuracy": val, "test_accuracy": accuracy(model, splits["test"]), "epoch": epoch}
        log(f"  epoch {epoch:3d}  loss {loss.item():.3f}  val {val:.3f}  best val {best['val_accuracy']:.3f} "
            f"(test {best['test_accuracy']:.3f})  {time.time() - t0:6.1f}s")
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="an mmray dataset directory")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--optuna-trials", type=int, default=0, help="run an Optuna TPE study of this many trials")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.time()
    info, splits, vocab_size = load(args.data)
    decode_s = time.time() - t0
    rows = {s: len(t["label"]) for s, t in splits.items()}
    print(f"{args.data}: {rows} rows, modalities {info['modalities']}, decoded in {decode_s:.1f}s", flush=True)
    curve: list[tuple[float, float]] = []
    fixed = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, t0=t0, curve=curve)
    defaults = {"lr": args.lr, "weight_decay": args.weight_decay, "dropout": args.dropout}
    if args.optuna_trials <= 0:
        best, params = train(info, splits, vocab_size, **defaults, **fixed), defaults
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        results: dict[int, dict] = {}

        def objective(trial: optuna.Trial) -> float:
            p = {"lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
                 "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
                 "dropout": trial.suggest_float("dropout", 0.0, 0.5)}
            print(f"trial {trial.number}: {p}", flush=True)
            results[trial.number] = train(info, splits, vocab_size, **p, **fixed)
            return results[trial.number]["val_accuracy"]

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed))
        study.enqueue_trial(defaults)
        study.optimize(objective, n_trials=args.optuna_trials)
        best, params = results[study.best_trial.number], study.best_params
    seconds = time.time() - t0
    print(f"best: val accuracy {best['val_accuracy']:.3f}  test accuracy {best['test_accuracy']:.3f}  "
          f"(epoch {best['epoch']}, {params})  {seconds:.1f}s on {args.threads} thread(s)")
    print("RESULT " + json.dumps({**best, "seconds": seconds, "decode_seconds": decode_s, "params": params,
                                  "trials": max(1, args.optuna_trials), "epochs": args.epochs,
                                  "threads": args.threads, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

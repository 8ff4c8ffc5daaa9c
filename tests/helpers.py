"""Shared test pieces: a small job that learns the built-in data fast, and a way to corrupt a record."""
from __future__ import annotations

import os
import string
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import yaml

from mmray.config import JobConfig, validate_job
from mmray.train.checkpoint import checkpoint_name

# Small encoders: the built-in task is learnable in a few epochs on 2 CPU cores.
SMALL_MODEL = {
    "encoders": {
        "image": {"name": "cnn", "channels": [16, 32, 64], "dim": 64},
        "text": {"name": "transformer", "dim": 64, "layers": 1, "heads": 4, "ff_dim": 128},
        "audio": {"name": "mel_cnn", "n_mels": 32, "channels": [16, 32, 64], "dim": 64},
    },
    "fusion": {"name": "concat", "hidden_dim": 128},
}

# How long a subprocess, a poll loop or a join may take before a test calls it hung: a guard against a hang,
# never a timing assumption. Generous, so that a machine whose cores another process keeps busy (the suite is
# checked beside `stress-ng --cpu 2`) makes the suite slower, never red. `make test`'s per-test limit is above it.
HANG_S = 1800

# The best any single modality can do on the built-in data (image: shape known, pitch a coin flip).
BEST_SINGLE_MODALITY_CEILING = 0.5


def small_job(data_path: str, *, name: str = "it", modalities=("audio", "image", "text"), epochs: int = 6,
              workers: int = 2, batch_size: int = 16, **train) -> JobConfig:
    return validate_job({
        "name": name,
        "data": {"path": data_path, "modalities": list(modalities)},
        "model": SMALL_MODEL,
        "train": {"epochs": epochs, "batch_size": batch_size, "optimizer": {"lr": 3e-3},
                  "early_stopping": {"patience": None}, **train},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5},
    })


def corrupt_image(shard: str, row: int = 0) -> str:
    """Replace one row's PNG bytes with garbage in place; returns that row's id."""
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[row] = b"\x89PNG not really"
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             __import__("pyarrow").array(images, type=table.schema.field("image").type))
    pq.write_table(table, shard)
    return table.column("id")[row].as_py()


# Tiny random-init Hugging Face vision models (built from config classes, saved with save_pretrained,
# loaded back by path: nothing is downloaded), with an image processor that feeds them 16 x 16 images.
TINY_VISION = ("vit", "clip", "siglip", "dinov2", "convnext", "swin")


def save_tiny_vision(folder, kind: str = "vit", size: int = 16) -> str:
    """A 1-layer, 32-wide random ``kind`` vision model and its image processor, saved as a model folder."""
    import torch
    import transformers as t

    common = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
              "image_size": size, "patch_size": 4}
    config, model, processor = {
        "vit": (t.ViTConfig, t.ViTModel, t.ViTImageProcessor),
        "clip": (t.CLIPVisionConfig, t.CLIPVisionModel, t.CLIPImageProcessor),
        "siglip": (t.SiglipVisionConfig, t.SiglipVisionModel, t.SiglipImageProcessor),
        "dinov2": (t.Dinov2Config, t.Dinov2Model, t.BitImageProcessor),
        "convnext": (t.ConvNextConfig, t.ConvNextModel, t.ConvNextImageProcessor),
        "swin": (t.SwinConfig, t.SwinModel, t.ViTImageProcessor),
    }[kind]
    if kind == "convnext":
        common = {"hidden_sizes": [8, 32], "depths": [1, 1], "num_stages": 2, "patch_size": 4}
    elif kind == "swin":  # 4x4 patches of 8, merged once to 2x2 of 16
        common = {"image_size": size, "patch_size": 4, "embed_dim": 8, "depths": [1, 1], "num_heads": [2, 2],
                  "window_size": 2}
    torch.manual_seed(0)
    model(config(**common)).save_pretrained(folder)
    if kind in ("clip", "dinov2"):  # resize the short side, then centre-crop to the model's size
        proc = processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    elif kind == "convnext":
        proc = processor(size={"shortest_edge": size})
    else:
        proc = processor(size={"height": size, "width": size})
    proc.save_pretrained(folder)
    return str(folder)


# Words of the tiny tokenizer's vocabulary (with the specials and a-z: more ids than VOCAB, so any test id embeds).
TINY_WORDS = "the a an is of and red blue green big small circle square triangle sound high low tone picture".split()


def save_tiny_bert(folder) -> str:
    """A 1-layer, 32-wide random BERT and its WordPiece tokenizer, saved as a Hugging Face model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *TINY_WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


def save_tiny_wav2vec2(folder, sample_rate: int = 8000) -> str:
    """A 1-layer, 32-wide random wav2vec2 (2 conv layers, 10x downsampling) + its feature extractor config."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layerdrop=0.0,
        mask_time_prob=0.0, mask_feature_prob=0.0,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=sample_rate, do_normalize=True).save_pretrained(folder)
    return str(folder)


def train_workers(pid: int) -> list[int]:
    """The pids of the Ray Train worker processes under the process ``pid`` (a CLI run the test started)."""
    import ray

    sys.path.insert(0, os.path.join(os.path.dirname(ray.__file__), "thirdparty_files"))  # Ray's bundled psutil
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


def wait_for_registered_checkpoint(run_dir, epoch: int, ended: Callable[[], str | None]) -> None:
    """Return once Ray has registered ``epoch``'s checkpoint of the run in ``run_dir`` (its
    ``checkpoint_manager_snapshot.json`` names it; the folder alone is not yet registered): the event a test that
    kills a run or a worker mid-way acts on. ``ended()`` is asked at every poll: a message when the run ended first
    (it may raise the run's own error instead), else None."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + HANG_S
    while not (os.path.isfile(snapshot) and checkpoint_name(epoch) in open(snapshot).read()):
        gone = ended()
        assert gone is None, gone
        assert time.monotonic() < deadline, f"epoch {epoch}'s checkpoint never registered"
        time.sleep(0.2)


# ------------------------------------------------------------------ refused commands (tests/unit/cli)
def job_file(data_dir: str, tmp_path: Path, *, workers: int) -> Path:
    """A valid job whose storage is an empty folder under ``tmp_path`` (see :func:`written`)."""
    raw = small_job(data_dir, workers=workers).model_dump(mode="json")
    raw["storage"] = str(tmp_path / "runs")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def written(tmp_path: Path) -> list[str]:
    """What the command wrote into the job's storage."""
    runs = tmp_path / "runs"
    return sorted(os.listdir(runs)) if runs.exists() else []


def fails(capsys, *argv: str) -> str:
    """Run ``mmray *argv``: it must exit 2 with ``mmray: ...`` on stderr and no traceback; returns stderr."""
    from mmray.cli.main import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmray: ") and "Traceback" not in err
    return err

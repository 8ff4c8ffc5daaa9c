"""A tiny synthetic dataset, a tiny model over it and its export, shared by the export tests (built once)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mmray.config import JobConfig, validate_job
from mmray.data.dataset_dir import DatasetInfo
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.data.tokenizer import TextTokenizer
from mmray.export import write_export
from mmray.models.builder import build_job_model, job_tasks

# Every size small enough that building, exporting and running the model takes well under a second.
TINY_MODEL = {
    "encoders": {
        "image": {"name": "cnn", "channels": [4, 8], "dim": 8, "dropout": 0.0},
        "text": {"name": "transformer", "dim": 8, "layers": 1, "heads": 2, "ff_dim": 16, "dropout": 0.0},
        "audio": {"name": "mel_cnn", "n_mels": 8, "n_fft": 128, "hop_length": 64, "dim": 8, "dropout": 0.0},
    },
    "fusion": {"name": "concat", "hidden_dim": 8, "dropout": 0.0},
}
TINY_DATA = {"image": {"size": 16}, "text": {"max_length": 8}, "audio": {"sample_rate": 4000, "seconds": 0.25}}


@dataclass
class Exported:
    data_dir: Path
    export_dir: Path
    info: DatasetInfo
    config: JobConfig
    tokenizer: TextTokenizer
    model: Any  # the in-memory MultimodalModel, eval mode


def tiny_config(data_dir: Path, modalities=("audio", "image", "text")) -> JobConfig:
    return validate_job({
        "name": "tiny",
        "data": {"path": str(data_dir), "modalities": list(modalities), **TINY_DATA},
        "model": TINY_MODEL,
        "train": {"epochs": 1, "batch_size": 16},
    })


def build_and_export(tmp: Path, config: JobConfig, info: DatasetInfo, out: Path) -> Exported:
    tokenizer = TextTokenizer.load(config.data.text, info)
    torch.manual_seed(0)
    model = build_job_model(config, job_tasks({k: list(v) for k, v in info.tasks.items()}), tokenizer)
    # One train-mode forward moves BatchNorm running statistics off their init values, so the
    # export has to carry buffers as well as parameters for the predictions to match.
    batch = next(iter_batches(config.data, info, "train", batch_size=32, train=False))
    with torch.no_grad():
        model.train()(batch)
    model.eval()
    write_export(out, model, config, info, tokenizer, {"val": {"accuracy": 0.5}}, epoch=3)
    return Exported(Path(info.path), out, info, config, tokenizer, model)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Exported:
    tmp = tmp_path_factory.mktemp("export")
    info = synth(out=str(tmp / "data"), rows=60, shards=1, seed=0)
    return build_and_export(tmp, tiny_config(tmp / "data"), info, tmp / "export")


@pytest.fixture
def tools():
    """The builders above, as a fixture (test modules do not import conftest)."""

    class Tools:
        config = staticmethod(tiny_config)
        build_and_export = staticmethod(build_and_export)

    return Tools

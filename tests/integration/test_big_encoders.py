"""An hf_image ViT with LoRA adapters and activation checkpointing on 2 Ray Train workers (DDP, gloo): the
base weights take no gradients and are not registered with DDP, checkpoints hold the adapters, and the export
(merged weights) predicts."""
from __future__ import annotations

import json
import os

import pytest
from helpers import save_tiny_vision

from mmray.config import validate_job
from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_lora_vit_trains_on_two_ray_workers_and_exports_merged_weights(tmp_path):
    from safetensors.torch import load_file

    from mmray.export import load_model
    from mmray.train.api import train

    data = str(tmp_path / "synth")
    synth(data, rows=200, shards=2, seed=0)
    vit = save_tiny_vision(tmp_path / "vit", "vit", 16)
    config = validate_job({
        "name": "lora-vit", "data": {"path": data, "modalities": ["image", "text"]},
        "model": {"encoders": {
            "image": {"name": "hf_image", "path": vit, "lora": {"rank": 2}, "gradient_checkpointing": True},
            "text": {"name": "transformer", "dim": 32, "layers": 1, "heads": 2, "ff_dim": 64,
                     "gradient_checkpointing": True},
        }, "fusion": {"name": "concat", "hidden_dim": 32}},
        "train": {"epochs": 2, "batch_size": 32, "early_stopping": {"patience": None}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    })
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        result = train(config, storage=str(tmp_path / "runs"))
    finally:
        ray.shutdown()
    checkpoint = os.path.join(result.run_dir, "checkpoint_epoch_0002")
    assert json.load(open(os.path.join(checkpoint, "frozen.json")))["lora_base"].keys() == {"encoders.image"}
    image_keys = [k for k in load_file(os.path.join(checkpoint, "model.safetensors")) if k.startswith("encoders.image.")]
    assert image_keys and all(".lora_" in k for k in image_keys)
    exported = load_file(os.path.join(result.export_dir, "model.safetensors"))
    assert not any("lora_" in k for k in exported)
    predictor = load_model(result.export_dir)
    assert len(predictor.predict(images=[_png()])) == 1


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()

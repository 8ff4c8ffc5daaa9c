"""An hf_image encoder with LoRA adapters through the whole local run (no Ray): it trains only the adapters,
checkpoints them alone (the base verified by hash), resumes, exports merged weights, and the export predicts
with peft unavailable and the model folder gone."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import save_tiny_vision
from PIL import Image
from safetensors.torch import load_file, save_file

from mmray.config import validate_job
from mmray.config.errors import UserError
from mmray.data.synth import synth
from mmray.train.local import train_local


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("lora") / "synth")
    synth(out, rows=64, shards=1, seed=3)
    return out


def lora_job(data: str, vit: str, epochs: int) -> object:
    return validate_job({
        "name": "lora", "data": {"path": data, "modalities": ["image", "text"]},
        "model": {"encoders": {
            "image": {"name": "hf_image", "path": vit, "lora": {"rank": 2, "alpha": 4}, "gradient_checkpointing": True},
            "text": {"name": "transformer", "dim": 32, "layers": 1, "heads": 2, "ff_dim": 64,
                     "gradient_checkpointing": True},
        }, "fusion": {"name": "concat", "hidden_dim": 32}},
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": {"lr": 5e-3},
                  "early_stopping": {"patience": None}, "lr_schedule": {"name": "constant", "warmup_ratio": 0.0}},
    })


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_lora_run_trains_adapters_resumes_exports_and_predicts_without_peft(data, tmp_path, monkeypatch):
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.export import load_model as load_export
    from mmray.models.builder import build_as_trained, job_tasks
    from mmray.train.checkpoint import load_model, lora_bases
    from mmray.train.finalize import export_checkpoint

    vit = save_tiny_vision(tmp_path / "vit", "vit", 16)
    run_dir = str(tmp_path / "run")
    first, _ = train_local(lora_job(data, vit, 2), run_dir)
    config = lora_job(data, vit, 3)
    info = read_dataset_info(data)
    tasks, tokenizer = job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)
    initial = build_as_trained(config, tasks, tokenizer).state_dict()

    # The checkpoint holds the adapters (and all that trains), not the pretrained weights under them.
    ckpt = os.path.join(run_dir, "checkpoint_epoch_0002")
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    image_keys = {k for k in saved if k.startswith("encoders.image.")}
    assert image_keys and all(".lora_" in k for k in image_keys)
    assert any(k.startswith("encoders.text.") for k in saved)
    assert set(lora_bases(ckpt)) == {"encoders.image"}
    assert json.load(open(os.path.join(ckpt, "frozen.json")))["left_out"] == {}

    # Loaded: the base weights are the pretrained ones, the adapters moved.
    trained = load_model(config, tasks, tokenizer, ckpt).state_dict()
    base = [k for k in trained if k.startswith("encoders.image.") and ".lora_" not in k]
    lora_b = [k for k in trained if ".lora_B." in k]
    assert base and all(torch.equal(trained[k], initial[k]) for k in base)
    assert lora_b and all(not torch.equal(trained[k], initial[k]) for k in lora_b)  # B starts at zero

    # Resumes from the adapters-only checkpoint (the base rebuilt and verified).
    events: list[dict] = []
    resumed, ctx = train_local(config, run_dir, on_event=events.append)
    assert events[0]["type"] == "resumed" and events[0]["epoch"] == 2
    assert [m["epoch"] for m in ctx.history] == [3] and resumed.history[:2] == first.history

    # Other pretrained weights under the same adapters are refused.
    other = save_tiny_vision(tmp_path / "vit-other", "vit", 16)
    weights = load_file(os.path.join(other, "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"pretrained weights under the LoRA adapters of encoders\.image"):
        load_model(lora_job(data, other, 3), tasks, tokenizer, os.path.join(run_dir, "checkpoint_epoch_0003"))

    # The export holds merged weights: the same predictions as the adapted model, without peft or the folder.
    last = os.path.join(run_dir, "checkpoint_epoch_0003")
    export_checkpoint(config, info, last, str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in exported)
    adapted = load_model(config, tasks, tokenizer, last).eval()
    shutil.move(vit, str(tmp_path / "vit-gone"))
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError):
        import peft  # noqa: F401
    predictor = load_export(str(tmp_path / "export"))
    images, texts = [png(i) for i in range(4)], ["a red circle", None, "blue", "a big square"]
    batch = predictor.decode_raw(images=images, texts=texts)
    with torch.no_grad():
        expected = torch.softmax(adapted({k: torch.as_tensor(v) for k, v in batch.items()}).logits["label"], -1)
    assert torch.allclose(predictor.predict_batch(batch), expected, atol=1e-5)
    rows = predictor.predict(images=images, texts=texts)
    assert len(rows) == 4 and all(r["class_name"] in predictor.class_names for r in rows)
    assert predictor.config.model.encoders.image.lora is None  # built without adapters

"""mmray export --quantize: compressed copies load with no Ray, predict like the original, and are smaller."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mmray.cli.main import main
from mmray.config import UserError
from mmray.data.reader import iter_batches
from mmray.export import load_model
from mmray.export.codec import (
    compress_state,
    dequantize_int8,
    load_compressed_state,
    quantize_weight_int8,
    read_quantization,
)
from mmray.export.compare import compare_with_source, format_comparison
from mmray.export.quantize import default_out, quantize_export


@pytest.fixture
def source(exported, tmp_path):
    """A private copy of the tiny export: compressed copies go next to it."""
    out = tmp_path / "export"
    shutil.copytree(exported.export_dir, out)
    return out


def _decoded(ex, split="train", batch_size=64):
    return next(iter_batches(ex.config.data, ex.info, split, batch_size=batch_size, train=False))


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16)[:, None, None, None]  # rows of very different scale
    w[5] = 0.0
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    err = (dequantize_int8(q, scale) - w).abs().reshape(16, -1).amax(dim=1)
    assert torch.all(err <= scale / 2 + 1e-7)
    assert torch.equal(dequantize_int8(q, scale)[5], w[5])


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.05), ("fp16", 2e-3), ("bf16", 2e-2)])
def test_each_mode_predicts_like_the_original_and_records_itself(exported, source, mode, tolerance):
    res = quantize_export(source, mode, min_kernel_elements=0)  # the tiny model's layers on int8 kernels too
    out = default_out(source, mode)
    assert res["out"] == str(out) and out.name == f"export-{mode}"
    spec = read_quantization(out)
    assert spec["mode"] == mode and spec["source"] == str(source.resolve())
    assert spec["source_metrics"] == {"val": {"accuracy": 0.5}, "epoch": 3}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["mmray.quantize"] == mode
    # everything but the weights is carried over unchanged
    for name in ("config.yaml", "labels.json", "metrics.json", "versions.json", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()

    batch = _decoded(exported)
    original, compressed = load_model(source), load_model(out)
    p0, p1 = original.predict_batch(batch), compressed.predict_batch(batch)
    assert (p0 - p1).abs().max() < tolerance
    if mode == "int8":
        assert spec["linear_layers"] and spec["int8_weights"]
        quantized = [m for m in compressed.model.modules() if type(m).__name__ == "Linear"
                     and m.__module__.startswith("torch.ao.nn.quantized")]
        assert len(quantized) == len(spec["linear_layers"])
    else:  # half precision on disk, float32 in memory
        assert res["weights_bytes"] < 0.6 * res["source_weights_bytes"]
        assert all(p.dtype == torch.float32 for p in compressed.model.parameters())


def test_int8_transformer_text_encoder_matches_float_on_raw_inputs(source):
    """The text encoder's feed-forward layers run in int8 (the fused transformer kernel cannot)."""
    quantize_export(source, "int8", min_kernel_elements=0)
    original, compressed = load_model(source), load_model(default_out(source, "int8"))
    texts = ["a faint hum", "a red square", None]
    a = [r["probabilities"] for r in original.predict(texts=texts)]
    b = [r["probabilities"] for r in compressed.predict(texts=texts)]
    for ra, rb in zip(a, b):
        assert max(abs(ra[k] - rb[k]) for k in ra) < 0.05


def test_compressed_export_loads_and_predicts_without_ray(source):
    quantize_export(source, "int8", min_kernel_elements=0)
    code = (
        "import sys, mmray\n"
        f"p = mmray.load_model({str(default_out(source, 'int8'))!r})\n"
        "rows = p.predict(texts=['a faint hum', 'a loud beep'])\n"
        "assert len(rows) == 2 and abs(sum(rows[0]['probabilities'].values()) - 1) < 1e-4, rows\n"
        "sys.exit(3 if 'ray' in sys.modules else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_only_wide_linear_layers_run_int8_kernels_by_default():
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.ReLU(), torch.nn.Linear(600, 16),
                                torch.nn.Linear(16, 2))
    state, kernels, weight_only = compress_state(model, "int8")
    assert kernels == ["0"] and weight_only == ["2.weight"]  # 16 x 2 is too small to be worth storing in int8
    assert state["0.weight"].dtype == state["2.weight"].dtype == torch.int8
    assert state["3.weight"].dtype == torch.float32 and state["0.bias"].dtype == torch.float32
    model.eval()
    rebuilt = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.ReLU(), torch.nn.Linear(600, 16),
                                  torch.nn.Linear(16, 2))
    load_compressed_state(rebuilt, state, {"mode": "int8", "linear_layers": kernels, "int8_weights": weight_only})
    assert type(rebuilt[0]).__module__.startswith("torch.ao.nn.quantized")
    assert type(rebuilt[2]) is torch.nn.Linear
    x = torch.randn(4, 600)
    with torch.inference_mode():
        assert (rebuilt(x) - model(x)).abs().max() < 0.05


def test_bad_requests_are_user_errors(source, tmp_path):
    with pytest.raises(UserError, match="'int4' is not a quantisation mode; choose one of int8, fp16, bf16"):
        quantize_export(source, "int4")
    with pytest.raises(UserError, match="not a model export folder"):
        quantize_export(tmp_path / "nowhere", "int8")
    with pytest.raises(UserError, match="is the source export itself"):
        quantize_export(source, "fp16", out=source)
    quantize_export(source, "fp16")
    with pytest.raises(UserError, match="already a compressed export"):
        quantize_export(default_out(source, "fp16"), "int8")
    with pytest.raises(UserError, match="not a compressed export"):
        compare_with_source(source, tmp_path)


def test_cli_exit_codes_and_default_folder(source, tmp_path, capsys):
    assert main(["export", str(source), "--quantize", "int4"]) == 2
    assert "choose one of int8, fp16, bf16" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["export", str(tmp_path / "plain"), "--quantize", "int8"]) == 2
    assert "not a model export folder" in capsys.readouterr().err
    assert not (tmp_path / "plain-int8").exists()
    assert main(["export", str(source), "--quantize", "bf16", "--out", str(tmp_path / "small")]) == 0
    assert "model.safetensors:" in capsys.readouterr().out
    assert read_quantization(tmp_path / "small")["mode"] == "bf16"


def test_evaluate_on_a_compressed_copy_shows_the_original_next_to_it(exported, source, capsys):
    quantize_export(source, "int8")
    out = default_out(source, "int8")
    assert main(["evaluate", str(out), "--data", str(exported.data_dir), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "compressed (int8) vs original on split val" in text and "ms/sample, batch 1" in text
    result = json.loads((out / "compare-val.json").read_text())
    assert result["original"]["measured"] and result["compressed"]["measured"]
    assert result["rows"] == exported.info.split_rows("val")
    assert 0.0 <= result["agreement"] <= 1.0
    for side in ("original", "compressed"):
        assert result[side]["ms_per_sample_batch1"] > 0 and result[side]["ms_per_sample_batched"] > 0
    assert result["compressed"]["weights_bytes"] < result["original"]["weights_bytes"]

    # with the original gone, its recorded metrics stand in for it
    shutil.rmtree(source)
    moved = compare_with_source(out, exported.data_dir, split="val", write=False)
    assert not moved["original"]["measured"] and moved["agreement"] is None
    assert moved["original"]["weights_bytes"] == result["original"]["weights_bytes"]
    assert "original not found" in format_comparison(moved)



# Small inputs and 64-wide encoders: learns well above chance in about 30 s on one core.
FAST_JOB = {
    "name": "quantize",
    "data": {"modalities": ["audio", "image", "text"], "image": {"size": 24}, "text": {"max_length": 16},
             "audio": {"sample_rate": 4000, "seconds": 0.5}},
    "model": {"encoders": {"image": {"name": "cnn", "channels": [8, 16], "dim": 64},
                           "text": {"name": "transformer", "dim": 64, "layers": 1, "heads": 4, "ff_dim": 128},
                           "audio": {"name": "mel_cnn", "n_mels": 16, "n_fft": 256, "hop_length": 128,
                                     "channels": [8, 16], "dim": 64}},
              "fusion": {"name": "concat", "hidden_dim": 128}},
    "train": {"epochs": 6, "batch_size": 32, "optimizer": {"lr": 1e-2}, "early_stopping": {"patience": None}},
    "scaling": {"num_workers": 1},
}


@pytest.mark.slow
def test_int8_keeps_a_trained_models_accuracy_and_shrinks_it(tmp_path):
    """A small model trained in-process (the shared loop, no Ray) on the built-in data, then int8."""
    from mmray.config import validate_job
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.synth import synth
    from mmray.train.finalize import export_checkpoint
    from mmray.train.local import train_local

    synth(str(tmp_path / "data"), rows=900, shards=1, seed=5)
    config = validate_job({**FAST_JOB, "data": {**FAST_JOB["data"], "path": str(tmp_path / "data")}})
    state, ctx = train_local(config, str(tmp_path / "run"))
    best = next(c for c in ctx.checkpoints if c.endswith(f"{state.best_epoch:04d}"))
    export_checkpoint(config, read_dataset_info(config.data.path), best, str(tmp_path / "export"))

    quantize_export(tmp_path / "export", "int8", min_kernel_elements=0)
    result = compare_with_source(tmp_path / "export-int8", tmp_path / "data", split="test")
    original, int8 = result["original"], result["compressed"]
    assert original["accuracy"] > 0.33, result  # learned: chance is 1/6
    assert abs(int8["accuracy"] - original["accuracy"]) <= 0.03, result
    assert result["agreement"] >= 0.95, result
    assert int8["weights_bytes"] < 0.4 * original["weights_bytes"], result

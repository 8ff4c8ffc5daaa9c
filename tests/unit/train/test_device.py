"""The GPU path of the loop: channels-last, torch.compile, per-epoch GPU figures. CPU-checkable parts run
everywhere; the CUDA runs are marked ``gpu`` and skip without CUDA."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import small_job

from mmray.data.dataset_dir import read_dataset_info
from mmray.data.reader import iter_batches
from mmray.data.synth import synth
from mmray.data.tokenizer import TextTokenizer
from mmray.models.builder import build_as_trained, job_tasks
from mmray.train.context import LocalContext
from mmray.train.device import DeviceMonitor, batch_to_device, channels_last_encoders, maybe_compile, to_channels_last
from mmray.train.local import train_local
from mmray.train.loop import device_figures

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("device") / "synth")
    synth(out, rows=120, shards=1, seed=4)
    return out


def _job(data: str, **train):
    return small_job(data, epochs=2, workers=1, batch_size=32, **train)


def _model_and_batch(config):
    info = read_dataset_info(config.data.path)
    model = build_as_trained(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info)).eval()
    batch = next(iter(iter_batches(config.data, info, "val", batch_size=16, train=False)))
    return model, batch


def test_channels_last_is_on_for_every_convolutional_encoder_unless_asked(tiny):
    model, _ = _model_and_batch(_job(tiny))  # a cnn image encoder, a mel_cnn audio encoder, a transformer for text
    assert channels_last_encoders(_job(tiny), model.encoders) == ("audio", "image")
    assert channels_last_encoders(_job(tiny, channels_last="off"), model.encoders) == ()
    text_only = small_job(tiny, modalities=("text",), epochs=1, workers=1)
    assert channels_last_encoders(text_only, _model_and_batch(text_only)[0].encoders) == ()


def test_a_vit_is_not_convolutional_its_one_convolution_is_the_patch_embedding(tmp_path):
    from helpers import save_tiny_vision

    from mmray.config import validate_job
    from mmray.models.encoders import ENCODERS
    from mmray.models.encoders.base import BuildContext
    from mmray.train.device import has_conv, is_convolutional

    folder = str(tmp_path / "vit")
    save_tiny_vision(folder, "vit", 16)
    config = validate_job({"name": "x", "data": {"path": "d"},
                           "model": {"encoders": {"image": {"name": "hf_image", "path": folder}}}})
    vit = ENCODERS.build(config.model.encoders.image, ctx=BuildContext(image_size=16))
    assert has_conv(vit) and not is_convolutional(vit)  # `on` would still put it in NHWC, `auto` leaves it


def test_channels_last_changes_the_layout_not_the_logits(tiny):
    model, batch = _model_and_batch(_job(tiny))
    with torch.inference_mode():
        expected = model(batch_to_device(batch, CPU)).logits["label"]
        to_channels_last(model.encoders, ("audio", "image"))
        nhwc = batch_to_device(batch, CPU, channels_last=True)
        assert nhwc["image"].is_contiguous(memory_format=torch.channels_last)
        for modality in ("audio", "image"):
            conv = next(m for m in model.encoders[modality].modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(nhwc).logits["label"], expected, rtol=1e-4, atol=1e-5)


def test_a_compiled_model_checkpoints_the_plain_modules_weights(tiny, tmp_path):
    from mmray.train.checkpoint import state_dict_for_saving

    config = _job(tiny, compile="default")
    model, _ = _model_and_batch(config)
    compiled = maybe_compile(model, config)
    assert compiled is not model and maybe_compile(model, _job(tiny)) is model
    assert state_dict_for_saving(compiled).keys() == model.state_dict().keys()  # no "_orig_mod." prefixes


def test_device_figures_are_absent_on_cpu():
    monitor = DeviceMonitor(CPU)
    monitor.start()
    assert monitor.stop() == {}
    ctx = LocalContext("", lambda e: (), lambda e: ())
    assert device_figures({}, ctx) == {}


def test_training_in_channels_last_learns_like_nchw(tiny, tmp_path):
    nhwc, _ = train_local(_job(tiny), str(tmp_path / "nhwc"))  # auto: the cnn and mel_cnn encoders in NHWC
    plain, ctx = train_local(_job(tiny, channels_last="off"), str(tmp_path / "plain"))
    for a, b in zip(plain.history, nhwc.history):
        assert b["train.loss"] == pytest.approx(a["train.loss"], rel=1e-3)
    assert "gpu.memory_peak_gb" not in nhwc.history[-1]


@pytest.mark.gpu
def test_cuda_run_reports_gpu_figures_and_compiles(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmray.train.checkpoint import load_model

    config = _job(tiny, compile="default")
    config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"use_gpu": True})})
    state, ctx = train_local(config, str(tmp_path / "run"), device="cuda")
    last = state.history[-1]
    assert 0 < last["gpu.memory_peak_gb"] <= last["gpu.memory_reserved_peak_gb"] <= last["gpu.memory_total_gb"]
    if "gpu.utilization" in last:  # NVML readable on this machine
        assert 0 <= last["gpu.utilization"] <= 100
    events = EventAccumulator(os.path.join(str(tmp_path / "run"), "tensorboard")).Reload()
    assert "gpu/memory_peak_gb" in events.Tags()["scalars"]
    # The compiled, channels-last, bf16 run's checkpoint reloads into a plain model.
    info = read_dataset_info(tiny)
    model = load_model(config, job_tasks(info.tasks), TextTokenizer.load(config.data.text, info), ctx.checkpoints[-1])
    assert set(model.state_dict()) == set(build_as_trained(config, job_tasks(info.tasks),
                                                           TextTokenizer.load(config.data.text, info)).state_dict())


@pytest.mark.slow
def test_a_compiled_run_trains_and_its_checkpoint_reloads_into_a_plain_model(tiny, tmp_path):
    """torch.compile on CPU (inductor, ~15 s of compiling for this image-only model)."""
    from mmray.train.checkpoint import load_model
    from mmray.train.evaluation import evaluate_model

    config = small_job(tiny, modalities=("image",), epochs=2, workers=1, batch_size=32, compile="default")
    state, ctx = train_local(config, str(tmp_path / "run"))
    assert state.history[-1]["train.loss"] < state.history[0]["train.loss"]
    info = read_dataset_info(tiny)
    model = load_model(config, job_tasks(info.tasks), None, ctx.checkpoints[-1])  # no "_orig_mod." keys to strip
    val = iter_batches(config.data, info, "val", batch_size=32, train=False)
    eager = evaluate_model(model, val, tasks=job_tasks(info.tasks), modalities=config.data.modalities)
    assert eager["val.accuracy"] == pytest.approx(state.history[-1]["val.accuracy"], abs=1e-6)

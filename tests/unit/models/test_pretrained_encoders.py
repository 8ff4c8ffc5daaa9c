"""Pretrained encoders: weights files, local-only Hugging Face loading, the checks that protect a user from
mismatched data settings, the hf_text tokenizer wiring in the schema, and the common encoder config keys."""
from __future__ import annotations

import os
import time

import pytest
import torch

from mmray.config import validate_job
from mmray.config.errors import ConfigError, UserError
from mmray.config.schema import DataConfig, ModelConfig
from mmray.data.tokenizer import TextTokenizer
from mmray.models import ENCODERS, BuildContext
from mmray.models.encoders import EncoderConfig


def build(name: str, ctx: BuildContext, tiny, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return ENCODERS.build(tiny.small(ENCODERS.entry(name), **overrides), ctx=ctx)


# ------------------------------------------------------------------------------ common config keys
@pytest.mark.parametrize("entry", ENCODERS.entries(), ids=lambda e: e.name)
def test_every_encoder_config_has_the_training_keys_and_a_summary(entry):
    assert issubclass(entry.config, EncoderConfig)
    fields = entry.config.model_fields
    assert {"freeze", "unfreeze_after_epochs", "lr_mult"} <= set(fields)
    assert entry.config.__doc__ and len(entry.config.__doc__.strip().splitlines()[0]) > 20  # `mmray ls` prints it


def test_unfreeze_after_epochs_needs_freeze_and_lr_mult_must_be_positive():
    with pytest.raises(ConfigError) as info:
        validate_job({
            "name": "x", "data": {"path": "d"},
            "model": {"encoders": {"text": {"name": "gru", "unfreeze_after_epochs": 2}, "image": {"lr_mult": 0}}},
        })
    problems = "\n".join(info.value.problems)
    assert "model.encoders.text.unfreeze_after_epochs: 2 needs freeze: true" in problems
    assert "model.encoders.image.lr_mult" in problems
    ok = validate_job({
        "name": "x", "data": {"path": "d"},
        "model": {"encoders": {"text": {"name": "gru", "freeze": True, "unfreeze_after_epochs": 2, "lr_mult": 0.1}}},
    })
    assert (ok.model.encoders.text.freeze, ok.model.encoders.text.unfreeze_after_epochs) == (True, 2)


def test_absolute_paths_resolves_local_files_and_keeps_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resnet = ENCODERS.entry("resnet18").config(weights="./w.pth").absolute_paths()
    assert resnet.weights == str(tmp_path / "w.pth")
    assert ENCODERS.entry("hf_text").config(path="org/model").absolute_paths().path == "org/model"
    cnn = ENCODERS.entry("cnn").config()
    assert cnn.absolute_paths() is cnn


# ------------------------------------------------------------------------------ resnet weights
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_loads_a_local_state_dict(suffix, ctx, tiny, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)  # fc included, as a torchvision/ImageNet file has it
    path = str(tmp_path / f"resnet18{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    enc = build("resnet18", ctx, tiny, seed=2, weights=path)
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(enc.net.state_dict()[key], source.state_dict()[key]), key
    fresh = build("resnet18", ctx, tiny, seed=2)
    assert not torch.equal(fresh.net.conv1.weight, source.conv1.weight)


def test_resnet_missing_weights_file_names_the_key_and_path(ctx, tiny, tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="model.encoders.image.weights") as info:
        build("resnet18", ctx, tiny, weights=missing)
    assert missing in str(info.value)
    # Rebuilding for a checkpoint or export (pretrained=False) never reads the file.
    assert build("resnet18", BuildContext(image_size=16, pretrained=False), tiny, weights=missing).output_dim == 16


def test_resnet_weights_of_another_architecture_are_a_user_error(ctx, tiny, tmp_path):
    import torchvision

    path = str(tmp_path / "resnet34.pth")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="does not fit ResNet"):
        build("resnet18", ctx, tiny, weights=path)


# ------------------------------------------------------------------------------ Hugging Face loading
@pytest.mark.parametrize("name", ["hf_text", "hf_audio"])
def test_unknown_hub_name_fails_fast_without_network(name, ctx, tiny):
    start = time.monotonic()
    with pytest.raises(UserError, match="not found locally") as info:
        build(name, ctx, tiny, path="mmray-tests/no-such-model")
    assert time.monotonic() - start < 15
    assert f"model.encoders.{ENCODERS.entry(name).modality}.path" in str(info.value)
    assert "local model folder" in str(info.value)


def test_missing_local_model_folder_names_the_key(ctx, tiny, tmp_path):
    with pytest.raises(UserError, match=r"model.encoders.text.path: .*no such folder"):
        build("hf_text", ctx, tiny, path=str(tmp_path / "absent"))


def test_hf_text_reads_its_own_tokenizer_ids(ctx, tiny):
    tok = TextTokenizer.from_pretrained(tiny.hf["hf_text"])
    ids, mask = tok.encode(["the red circle", "a big blue square is the picture", None], ctx.max_text_length)
    assert ids[0, 0] == 2 and mask[0].sum() == 5  # [CLS] the red circle [SEP]
    enc = build("hf_text", BuildContext(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, max_text_length=8),
                tiny).eval()
    out = enc({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    assert out.pooled.shape == (3, 16) and torch.equal(out.pooled[2], torch.zeros(16))
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_hf_text_cls_pooling_and_hidden_size_output(ctx, tiny):
    enc = build("hf_text", ctx, tiny, pool="cls", dim=None).eval()
    batch = tiny.blank(tiny.batch(3), "text", [2])
    out = enc(batch)
    assert enc.output_dim == 32  # the tiny BERT's hidden size
    torch.testing.assert_close(out.pooled[:2], out.sequence[:2, 0])
    assert torch.equal(out.pooled[2], torch.zeros(32))


def test_hf_text_longer_than_the_model_positions_is_a_user_error(tiny):
    with pytest.raises(UserError, match=r"data.text.max_length: 100 exceeds the 64 positions"):
        build("hf_text", BuildContext(vocab_size=50, max_text_length=100), tiny)


def test_hf_text_with_a_bigger_tokenizer_than_the_model_is_a_user_error(tiny):
    with pytest.raises(UserError, match="data.text.tokenizer"):
        build("hf_text", BuildContext(vocab_size=30522, max_text_length=8), tiny)


def test_hf_weights_are_loaded_unless_rebuilding_for_a_checkpoint(ctx, tiny):
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(tiny.hf["hf_text"]).state_dict()
    loaded = build("hf_text", ctx, tiny).model.state_dict()
    skeleton = build("hf_text", BuildContext(vocab_size=50, max_text_length=8, pretrained=False), tiny, seed=5).model
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(loaded[key], saved[key])
    assert not torch.equal(skeleton.state_dict()[key], saved[key])
    assert set(skeleton.state_dict()) == set(loaded)


def test_hf_audio_sample_rate_mismatch_names_data_audio_sample_rate(tiny):
    with pytest.raises(UserError, match=r"data.audio.sample_rate: 16000 Hz, but .* expects 8000 Hz"):
        build("hf_audio", BuildContext(sample_rate=16000, audio_samples=4000), tiny)


def test_hf_audio_rejects_a_model_without_raw_waveform_input(ctx, tiny):
    with pytest.raises(UserError, match="does not read raw waveforms"):
        build("hf_audio", ctx, tiny, path=tiny.hf["hf_text"])


def test_hf_audio_normalises_loudness_like_its_feature_extractor(ctx, tiny):
    enc = build("hf_audio", ctx, tiny).eval()
    batch = tiny.batch(2)
    quiet = dict(batch, audio=batch["audio"] * 0.01)
    torch.testing.assert_close(enc(quiet).pooled, enc(batch).pooled, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ schema wiring
def _job(tiny, data: dict | None = None, **text) -> dict:
    return {
        "name": "x",
        "data": {"path": "d", **(data or {})},
        "model": {"encoders": {"text": {"name": "hf_text", "path": tiny.hf["hf_text"], **text}}},
    }


def test_hf_text_sets_the_data_tokenizer_to_its_own(tiny):
    job = validate_job(_job(tiny))
    assert job.data.text.tokenizer == tiny.hf["hf_text"]
    same = validate_job(_job(tiny, {"text": {"tokenizer": tiny.hf["hf_text"] + "/", "max_length": 16}}))
    assert same.data.text.max_length == 16
    # Built config objects are wired too, not only raw YAML mappings.
    from mmray.config.schema import JobConfig

    built = JobConfig(name="x", data=DataConfig(path="d"), model=ModelConfig.model_validate(_job(tiny)["model"]))
    assert built.data.text.tokenizer == tiny.hf["hf_text"]


def test_hf_text_with_another_data_tokenizer_names_both_keys(tiny):
    with pytest.raises(ConfigError) as info:
        validate_job(_job(tiny, {"text": {"tokenizer": "bert-base-uncased"}}))
    message = str(info.value)
    assert "data.text.tokenizer" in message and "model.encoders.text.path" in message
    assert "bert-base-uncased" in message


def test_other_text_encoders_keep_the_dataset_tokenizer(tiny):
    assert validate_job({"name": "x", "data": {"path": "d"}}).data.text.tokenizer is None
    no_text = validate_job(_job(tiny, {"modalities": ["image"], "text": {"tokenizer": "other"}}))
    assert no_text.data.text.tokenizer == "other"  # hf_text is not built without text: no conflict


def test_tiny_hf_folders_are_real_hugging_face_folders(tiny):
    assert os.path.isfile(os.path.join(tiny.hf["hf_text"], "tokenizer.json"))
    assert os.path.isfile(os.path.join(tiny.hf["hf_audio"], "preprocessor_config.json"))


# ------------------------------------------------------------------------------ Whisper's encoder
@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> str:
    """A tiny random Whisper (1 layer, 32 wide, 40 mel frames = 0.4 s window) with a 16 kHz feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    folder = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80,
        max_source_positions=20, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(folder)
    return str(folder)


WHISPER_CTX = BuildContext(sample_rate=16000, audio_samples=4000)


def test_whisper_log_mel_matches_its_feature_extractor(tiny_whisper, tiny):
    from transformers import WhisperFeatureExtractor

    enc = build("hf_audio", WHISPER_CTX, tiny, path=tiny_whisper).eval()
    wave = 0.1 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    wave[1] = 0.0  # a missing clip
    fe = WhisperFeatureExtractor.from_pretrained(tiny_whisper)
    expected = fe(list(wave.numpy()), sampling_rate=16000, padding="max_length", max_length=enc.log_mel.window_samples,
                  return_tensors="pt").input_features
    torch.testing.assert_close(enc.log_mel(wave), expected, atol=1e-4, rtol=1e-4)


def test_whisper_encoder_returns_the_frames_of_the_clip_and_trains(tiny_whisper, tiny):
    enc = build("hf_audio", WHISPER_CTX, tiny, path=tiny_whisper).train()
    out = enc({"audio": 0.1 * torch.randn(3, 4000, generator=torch.Generator().manual_seed(1))})
    assert enc.log_mel.frames == 13  # ceil(4000 samples / (160 hop * 2 conv stride))
    assert out.pooled.shape == (3, 16) and out.sequence.shape == (3, 13, 16)
    out.pooled.square().mean().backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]  # Whisper's positions are fixed
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    assert not [k for k in enc.state_dict() if k.startswith("log_mel.")]


def test_whisper_clip_longer_than_its_window_is_a_user_error(tiny_whisper, tiny):
    with pytest.raises(UserError, match="data.audio.seconds"):
        build("hf_audio", BuildContext(sample_rate=16000, audio_samples=16000), tiny, path=tiny_whisper)

"""Every registered encoder: shapes, gradients, missing inputs, padding, determinism, build-time checks."""
from __future__ import annotations

import pytest
import torch

from mmray.config.errors import UserError
from mmray.models import ENCODERS, BuildContext
from mmray.registry import UnknownComponentError

ALL = ENCODERS.entries()


def build(entry, ctx, tiny, seed=0, **overrides):
    torch.manual_seed(seed)
    return entry.builder(tiny.small(entry, **overrides), ctx=ctx)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_output_shapes_match_output_dim(entry, ctx, tiny):
    enc = build(entry, ctx, tiny).eval()
    out = enc(tiny.batch(5))
    assert out.pooled.shape == (5, enc.output_dim)
    assert out.sequence is not None and out.sequence.shape[0] == 5 and out.sequence.shape[2] == enc.output_dim
    assert out.sequence_mask.dtype == torch.bool and out.sequence_mask.shape == out.sequence.shape[:2]
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.sequence).all()


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_gradients_reach_every_parameter(entry, ctx, tiny):
    enc = build(entry, ctx, tiny).train()
    out = enc(tiny.batch(4))
    (out.pooled.square().mean() + out.sequence.square().mean()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{entry.name}.{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{entry.name}.{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{entry.name}.{name} has an all-zero gradient"


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_missing_input_gives_finite_output(entry, ctx, tiny):
    """A missing modality arrives as zeros (all-pad text, silent audio, black image): no NaN, even in training."""
    batch = tiny.blank(tiny.batch(4), entry.modality, slice(None))
    enc = build(entry, ctx, tiny).train()
    out = enc(batch)
    out.pooled.sum().backward()
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.sequence).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize("entry", ENCODERS.entries("text"), ids=lambda e: e.name)
def test_text_empty_rows_pool_to_zero_and_padding_is_ignored(entry, ctx, tiny):
    batch = tiny.blank(tiny.batch(4), "text", [1])
    enc = build(entry, ctx, tiny).eval()
    out = enc(batch)
    assert torch.equal(out.pooled[1], torch.zeros(enc.output_dim))
    assert torch.equal(out.sequence_mask, batch["attention_mask"].bool())
    # Garbage token ids under the padding mask change nothing.
    noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
    torch.testing.assert_close(enc(noisy).pooled, out.pooled)


@pytest.mark.parametrize("entry", ENCODERS.entries("text"), ids=lambda e: e.name)
def test_text_longer_than_built_length_is_a_user_error(entry, ctx, tiny):
    enc = build(entry, ctx, tiny)
    long = torch.ones(2, ctx.max_text_length + 1, dtype=torch.long)
    with pytest.raises(UserError, match="max_length"):
        enc({"input_ids": long, "attention_mask": long})


def test_gru_rejects_left_padding(ctx, tiny):
    enc = build(ENCODERS.entry("gru"), ctx, tiny)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(UserError, match="right-padded"):
        enc({"input_ids": mask, "attention_mask": mask})


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_deterministic_under_manual_seed(entry, ctx, tiny):
    batch = tiny.batch(3)
    a = build(entry, ctx, tiny, seed=3, dropout=0.2).train()
    b = build(entry, ctx, tiny, seed=3, dropout=0.2).train()
    torch.manual_seed(5)
    out_a = a(batch).pooled
    torch.manual_seed(5)
    out_b = b(batch).pooled
    assert torch.equal(out_a, out_b)


def test_text_encoder_without_vocabulary_is_a_user_error(tiny):
    with pytest.raises(UserError, match="vocab_size"):
        build(ENCODERS.entry("transformer"), BuildContext(), tiny)


def test_transformer_heads_must_divide_dim():
    with pytest.raises(ValueError, match="multiple of heads"):
        ENCODERS.entry("transformer").config(dim=10, heads=4)


def test_image_too_small_for_the_cnn_names_the_key(ctx, tiny):
    with pytest.raises(UserError, match="model.encoders.image.channels"):
        build(ENCODERS.entry("cnn"), ctx, tiny, channels=(4, 4, 4, 4, 4))


def test_audio_clip_shorter_than_fft_names_the_key(tiny):
    short = BuildContext(sample_rate=8000, audio_samples=100)
    with pytest.raises(UserError, match="model.encoders.audio.n_fft"):
        build(ENCODERS.entry("mel_cnn"), short, tiny)


def test_mel_filterbank_is_not_saved_with_the_weights(ctx, tiny):
    enc = build(ENCODERS.entry("mel_cnn"), ctx, tiny)
    assert not [k for k in enc.state_dict() if k.startswith("mel.")]


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(UnknownComponentError) as info:
        ENCODERS.entry("nope", "image")
    assert "'nope'" in str(info.value)
    assert info.value.choices == ENCODERS.names("image") and "cnn" in str(info.value)

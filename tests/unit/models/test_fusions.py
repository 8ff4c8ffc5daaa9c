"""Every registered fusion: output size, gradients, and that a missing modality is really ignored."""
from __future__ import annotations

import pytest
import torch

from mmray.models import FUSIONS

ALL = FUSIONS.entries()
DIMS = {"audio": 16, "image": 12, "text": 8}


def build(entry, tiny, dims=DIMS, seed=0, **overrides):
    torch.manual_seed(seed)
    return entry.builder(tiny.small(entry, **overrides), input_dims=dims)


def inputs(dims=DIMS, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = {m: torch.randn(size, d, generator=g) for m, d in dims.items()}
    return emb, {m: torch.ones(size, dtype=torch.bool) for m in dims}


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
@pytest.mark.parametrize("dims", [DIMS, {"text": 8}, {"audio": 16, "image": 12}], ids=["all", "text", "audio+image"])
def test_output_shape_matches_output_dim(entry, dims, tiny):
    fusion = build(entry, tiny, dims).eval()
    out = fusion(*inputs(dims))
    assert out.shape == (5, fusion.output_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_summary_names_the_method(entry):
    assert entry.summary, f"fusion {entry.name!r} needs a docstring whose first line names the method"


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_gradients_reach_every_parameter_and_input(entry, tiny):
    fusion = build(entry, tiny).train()
    emb, present = inputs()
    for t in emb.values():
        t.requires_grad_(True)
    fusion(emb, present).square().mean().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{entry.name}.{name} gets no gradient"
    for m, t in emb.items():
        assert t.grad.abs().sum() > 0, f"{entry.name} ignores {m}"


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
@pytest.mark.parametrize("modality", sorted(DIMS))
def test_missing_modality_is_ignored(entry, modality, tiny):
    """With ``present`` False in a row, that row's output does not depend on the modality's embedding there."""
    fusion = build(entry, tiny).eval()
    emb, present = inputs()
    present[modality][2] = False
    base = fusion(emb, present)
    perturbed = dict(emb, **{modality: emb[modality].clone()})
    perturbed[modality][2] = 100.0 * torch.randn(DIMS[modality])
    out = fusion(perturbed, present)
    torch.testing.assert_close(out[2], base[2])
    # ... while a present row does depend on it (so the check above is not vacuous).
    perturbed[modality][3] += 1.0
    assert not torch.allclose(fusion(perturbed, present)[3], base[3])


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_all_modalities_missing_is_finite(entry, tiny):
    fusion = build(entry, tiny).train()
    emb, present = inputs()
    present = {m: torch.zeros_like(p) for m, p in present.items()}
    assert torch.isfinite(fusion(emb, present)).all()


def test_concat_never_lets_a_missing_embedding_leak_even_nan(tiny):
    fusion = build(FUSIONS.entry("concat"), tiny)
    emb, present = inputs()
    emb["text"][1] = float("nan")
    present["text"][1] = False
    assert torch.isfinite(fusion(emb, present)).all()


def test_concat_without_layers_is_the_zero_filled_concatenation(tiny):
    fusion = build(FUSIONS.entry("concat"), tiny, layers=0)
    emb, present = inputs()
    present["image"][0] = False
    out = fusion(emb, present)
    assert fusion.output_dim == sum(DIMS.values()) and not list(fusion.parameters())
    expected = torch.cat([emb["audio"], emb["image"], emb["text"]], dim=1)  # sorted modality order
    expected[0, 16:28] = 0.0
    assert torch.equal(out, expected)

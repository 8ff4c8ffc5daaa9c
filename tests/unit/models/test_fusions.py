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


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_all_missing_rows_have_finite_gradients_and_nan_never_leaks(entry, tiny):
    fusion = build(entry, tiny).train()
    emb, present = inputs()
    for m in present:
        present[m][0] = False  # row 0: nothing at all
    emb["image"][1] = float("nan")  # row 1: a NaN where the image is missing
    present["image"][1] = False
    for t in emb.values():
        t.requires_grad_(True)
    out = fusion(emb, present)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_deterministic_under_manual_seed(entry, tiny):
    emb, present = inputs()
    outs = []
    for _ in range(2):
        fusion = build(entry, tiny, seed=3, dropout=0.2).train()
        torch.manual_seed(5)
        outs.append(fusion(emb, present))
    assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- method-specific properties
def test_attention_weights_sum_to_one_over_present_modalities(tiny):
    fusion = build(FUSIONS.entry("attention"), tiny).eval()
    emb, present = inputs()
    present["image"][1] = False
    present["audio"][2] = present["text"][2] = False
    for m in present:
        present[m][3] = False
    alpha = fusion.weights(emb, present)  # [B, M, heads], modalities sorted: audio, image, text
    mask = torch.stack([present[m] for m in sorted(present)], dim=1)[..., None].expand_as(alpha)
    assert alpha.shape == (5, 3, fusion.heads) and fusion.heads > 1
    assert torch.equal(alpha[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(alpha.sum(dim=1), torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])[:, None].expand(5, fusion.heads))
    assert (alpha[2, 1] == 1.0).all()  # only the image is left in row 2


def test_attention_weights_start_near_uniform_then_depend_on_the_sample(tiny):
    fusion = build(FUSIONS.entry("attention"), tiny, heads=2).train()
    emb, present = inputs()
    torch.testing.assert_close(fusion.weights(emb, present), torch.full((5, 3, 2), 1 / 3), atol=0.01, rtol=0)
    opt = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    fusion(emb, present)[:, 0].sum().backward()
    opt.step()
    alpha = fusion.weights(emb, present)
    assert not torch.allclose(alpha[0], alpha[1])  # per-sample weights


def test_gated_with_one_modality_present_is_that_modalitys_tanh_features(tiny):
    fusion = build(FUSIONS.entry("gated"), tiny).eval()
    emb, present = inputs()
    present["audio"][0] = present["text"][0] = False
    expected = torch.tanh(fusion.features["image"](emb["image"][:1]))
    torch.testing.assert_close(fusion(emb, present)[:1], expected)
    # Two present modalities: per output unit a convex mix (the GMU's z h_1 + (1 - z) h_2).
    present["image"][1] = False
    h = {m: torch.tanh(fusion.features[m](emb[m][1])) for m in ("audio", "text")}
    out = fusion(emb, present)[1]
    z = (out - h["text"]) / (h["audio"] - h["text"])
    assert ((z >= -1e-4) & (z <= 1 + 1e-4)).all()


def test_late_fusion_is_the_mean_of_per_modality_outputs(tiny):
    fusion = build(FUSIONS.entry("late"), tiny).eval()
    emb, present = inputs()
    present["audio"][0] = present["text"][0] = False  # row 0: image only
    present["image"][1] = False  # row 1: audio and text
    out = fusion(emb, present)
    branch = {m: fusion.branches[m](emb[m]) for m in DIMS}
    torch.testing.assert_close(out[0], branch["image"][0])
    torch.testing.assert_close(out[1], (branch["audio"][1] + branch["text"][1]) / 2)
    torch.testing.assert_close(out[2], sum(b[2] for b in branch.values()) / 3)


def test_late_fusion_learned_weights_start_as_the_mean_and_train(tiny):
    emb, present = inputs()
    mean = build(FUSIONS.entry("late"), tiny, combine="mean").eval()
    learned = build(FUSIONS.entry("late"), tiny, combine="learned").eval()
    torch.testing.assert_close(learned(emb, present), mean(emb, present))
    learned(emb, present).sum().backward()
    assert learned.scores.grad.abs().sum() > 0


def test_tensor_fusion_keeps_unimodal_and_bimodal_terms(tiny):
    fusion = build(FUSIONS.entry("tensor"), tiny, dim=4, layers=0).eval()
    assert fusion.output_dim == 5 ** 3  # (dim + 1) per modality, three modalities
    emb, present = inputs()
    present["text"][0] = False
    z = {m: fusion.proj[m](emb[m]) for m in DIMS}
    t = fusion(emb, present).view(-1, 5, 5, 5)  # axes: audio, image, text (sorted)
    torch.testing.assert_close(t[:, 4, 4, 4], torch.ones(5))  # 1 x 1 x 1
    torch.testing.assert_close(t[:, :4, 4, 4], z["audio"])  # unimodal terms pass through the 1s
    torch.testing.assert_close(t[1, :4, :4, :4], torch.einsum("i,j,k->ijk", z["audio"][1], z["image"][1], z["text"][1]))
    # Text missing in row 0: every term with a text factor is 0, the audio x image terms are intact.
    assert torch.equal(t[0, :, :, :4], torch.zeros(5, 5, 4))
    torch.testing.assert_close(t[0, :4, :4, 4], torch.outer(z["audio"][0], z["image"][0]))


def test_low_rank_fusion_equals_tensor_fusion_with_the_reassembled_weight_tensor(tiny):
    from mmray.models.fusion.tensor import tensor_product

    dims = {"audio": 3, "image": 2, "text": 4}
    fusion = build(FUSIONS.entry("low_rank_tensor"), tiny, dims=dims, rank=3, hidden_dim=5).eval()
    emb, present = inputs(dims)
    present["image"][1] = False
    f = fusion.factors
    # W[h] = sum_r lambda_r  w_audio^r[:, h] x w_image^r[:, h] x w_text^r[:, h]   [4 x 3 x 5 per h]
    weight = torch.einsum("r,rah,rih,rth->aith", fusion.rank_weights, f["audio"], f["image"], f["text"])
    masked = {m: torch.where(present[m][:, None], emb[m], 0.0) for m in dims}
    full = tensor_product([masked[m] for m in sorted(dims)]) @ weight.reshape(-1, 5) + fusion.bias
    torch.testing.assert_close(fusion(emb, present), full)


def test_cross_attention_reads_sequences_and_ignores_their_padding(tiny):
    fusion = build(FUSIONS.entry("cross_attention"), tiny).eval()
    emb, present = inputs()
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(5, 6, DIMS["text"], generator=g)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 4:] = False
    base = fusion(emb, present, sequences={"text": (seq, mask)})
    assert not torch.allclose(base, fusion(emb, present))  # the tokens matter ...
    noisy = seq.clone()
    noisy[:, 4:] = 100.0
    torch.testing.assert_close(fusion(emb, present, sequences={"text": (noisy, mask)}), base)  # ... padding does not
    present["text"][0] = False
    noisy[0] = float("nan")  # a missing modality's whole sequence is masked too
    out = fusion(emb, present, sequences={"text": (noisy, mask)})
    assert torch.isfinite(out).all()


def test_cross_attention_caps_long_sequences_by_masked_averaging():
    from mmray.models.fusion.cross_attention import cap_tokens

    seq = torch.arange(8.0).view(1, 8, 1).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    out, out_mask = cap_tokens(seq, mask, 4)
    assert out.shape == (2, 4, 1)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    torch.testing.assert_close(out[1, :2, 0], torch.tensor([0.5, 2.0]))  # padding never enters an average
    assert out_mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_cross_attention_heads_must_divide_hidden_dim():
    with pytest.raises(ValueError, match="multiple of heads"):
        FUSIONS.entry("cross_attention").config(hidden_dim=10, heads=4)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_every_fusion_is_selectable_by_name_with_its_dropout_in_a_job_config(entry):
    from mmray.config.schema import ModelConfig

    config = ModelConfig(fusion={"name": entry.name, "dropout": 0.3})
    assert isinstance(config.fusion, entry.config) and config.fusion.dropout == 0.3


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_cross_attention_pools_ignore_a_missing_modality_and_stay_finite(pool, tiny):
    fusion = build(FUSIONS.entry("cross_attention"), tiny, pool=pool, max_tokens=3).eval()
    emb, present = inputs()
    seqs = {"text": (torch.randn(5, 6, DIMS["text"]), torch.ones(5, 6, dtype=torch.bool))}
    present["text"][1] = False
    for m in present:
        present[m][0] = False
    base = fusion(emb, present, sequences=seqs)
    noisy = seqs["text"][0].clone()
    noisy[1] = 100.0
    out = fusion(dict(emb, text=emb["text"] * 50), present, sequences={"text": (noisy, seqs["text"][1])})
    torch.testing.assert_close(out[:2], base[:2])
    assert torch.isfinite(base).all()

"""The assembled model, for every fusion and text encoder: it learns, every weight trains, missing data is ignored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmray.config.errors import UserError
from mmray.config.schema import DataConfig, ModelConfig
from mmray.models import ENCODERS, FUSIONS, BuildContext, ModelOutput, MultimodalModel, build_model

MODALITIES = ("audio", "image", "text")
TASKS = {"label": 3, "label_mood": 2}
FUSION_NAMES = FUSIONS.names()
TEXT_NAMES = ENCODERS.names("text")


def build(ctx, tiny, fusion="concat", text="transformer", modalities=MODALITIES, tasks=TASKS, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny.model_config(fusion, text, **kw), modalities=modalities, tasks=tasks, ctx=ctx)


def loss_of(out: ModelOutput, batch) -> torch.Tensor:
    return sum(F.cross_entropy(logits, batch["label"] % logits.shape[1]) for logits in out.logits.values())


def test_forward_returns_logits_per_task_and_embeddings_per_modality(ctx, tiny):
    model = build(ctx, tiny)
    out = model(tiny.batch(4))
    assert isinstance(model, MultimodalModel) and model.modalities == MODALITIES
    assert {t: x.shape for t, x in out.logits.items()} == {"label": (4, 3), "label_mood": (4, 2)}
    assert {m: x.shape[0] for m, x in out.embeddings.items()} == {m: 4 for m in MODALITIES}
    assert out.fused.shape == (4, model.fusion.output_dim)


@pytest.mark.parametrize("modalities", [("text",), ("image",), ("audio", "image")])
def test_subset_of_modalities_builds_only_those_encoders(modalities, ctx, tiny):
    model = build(ctx, tiny, modalities=modalities)
    keys = {k for m in modalities for k in (*tiny.keys[m], f"{m}_present")}
    batch = {k: v for k, v in tiny.batch(3).items() if k in keys}
    assert tuple(model.encoders) == tuple(sorted(modalities))
    assert model(batch).logits["label"].shape == (3, 3)


@pytest.mark.parametrize("text", TEXT_NAMES)
@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_every_trainable_parameter_changes_after_one_step(fusion, text, ctx, tiny):
    model = build(ctx, tiny, fusion, text).train()
    batch = tiny.batch(6)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # no weight decay: only gradients move weights
    loss_of(model(batch), batch).backward()
    opt.step()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not frozen, f"{fusion}+{text}: parameters did not change: {frozen}"


@pytest.mark.parametrize("fusion", FUSION_NAMES)
@pytest.mark.parametrize("modality", MODALITIES)
def test_missing_modality_content_does_not_reach_that_rows_output(fusion, modality, ctx, tiny):
    model = build(ctx, tiny, fusion).eval()
    batch = tiny.batch(5)
    batch[f"{modality}_present"][1] = False
    other = tiny.batch(5, seed=9)  # different content for the same modality
    perturbed = dict(batch)
    for key in tiny.keys[modality]:
        perturbed[key] = batch[key].clone()
        perturbed[key][[1, 2]] = other[key][[1, 2]]
    with torch.no_grad():
        base, out = model(batch), model(perturbed)
    torch.testing.assert_close(out.fused[1], base.fused[1])
    torch.testing.assert_close(out.logits["label"][1], base.logits["label"][1])
    assert not torch.allclose(out.fused[2], base.fused[2])  # row 2 has it present: it must matter


@pytest.mark.parametrize("text", TEXT_NAMES)
@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_all_missing_text_and_audio_rows_are_finite(fusion, text, ctx, tiny):
    model = build(ctx, tiny, fusion, text).train()
    batch = tiny.blank(tiny.blank(tiny.batch(4), "text", slice(None)), "audio", slice(None))
    batch["image_present"][0] = False
    batch["image"][0] = 0.0  # row 0 has nothing at all
    out = model(batch)
    loss_of(out, batch).backward()
    assert all(torch.isfinite(x).all() for x in out.logits.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_absent_present_keys_mean_all_present(ctx, tiny):
    model = build(ctx, tiny).eval()
    batch = tiny.batch(3)
    bare = {k: v for k, v in batch.items() if not k.endswith("_present")}
    torch.testing.assert_close(model(bare).fused, model(batch).fused)


# Every fusion (with the default text encoder) and every text encoder (with concat): each component once.
OVERFIT_CASES = [(f, "transformer") for f in FUSION_NAMES] + [("concat", t) for t in TEXT_NAMES if t != "transformer"]


@pytest.mark.parametrize("fusion,text", OVERFIT_CASES, ids=[f"{f}-{t}" for f, t in OVERFIT_CASES])
def test_tiny_model_overfits_a_fixed_batch(fusion, text, ctx, tiny):
    model = build(ctx, tiny, fusion, text=text, tasks={"label": 4}).train()
    batch = tiny.batch(16, seed=1, num_classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(batch).logits["label"], batch["label"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], f"{fusion}/{text}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_deterministic_under_manual_seed(ctx, tiny):
    batch = tiny.batch(4)
    outs = []
    for _ in range(2):
        model = build(ctx, tiny, seed=7)
        torch.manual_seed(1)
        outs.append(model(batch).logits["label"])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], build(ctx, tiny, seed=8)(batch).logits["label"])


def test_default_model_config_builds_for_default_data():
    data = DataConfig(path="unused")
    ctx = BuildContext.from_config(data, vocab_size=100, pad_token_id=0)
    assert (ctx.max_text_length, ctx.image_size, ctx.audio_samples) == (32, 32, 8000)
    model = build_model(ModelConfig(), modalities=data.modalities, tasks={"label": 5}, ctx=ctx).eval()
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "input_ids": torch.ones(2, 32, dtype=torch.long),
        "attention_mask": torch.ones(2, 32, dtype=torch.long),
        "audio": torch.randn(2, 8000),
    }
    assert model(batch).logits["label"].shape == (2, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modalities": ()}, "data.modalities"),
        ({"modalities": ("video",)}, "data.modalities"),
        ({"tasks": {}}, "at least one task"),
        ({"tasks": {"label": 1}}, "'label' has 1 class"),
    ],
)
def test_bad_build_arguments_are_user_errors(kwargs, message, ctx, tiny):
    with pytest.raises(UserError, match=message):
        build(ctx, tiny, **kwargs)

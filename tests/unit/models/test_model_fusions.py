"""Every fusion inside the assembled model: sequence-reading fusions get sequences, late fusion's decisions.

(That every fusion and text encoder learns is in test_multimodal_model.py.)
"""
from __future__ import annotations

import pytest
import torch

from mmray.models import FUSIONS, build_model

MODALITIES = ("audio", "image", "text")


def build(ctx, tiny, fusion, tasks=None, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny.model_config(fusion, **kw), modalities=MODALITIES, tasks=tasks or {"label": 4}, ctx=ctx)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_only_sequence_fusions_get_the_encoders_sequences(fusion, ctx, tiny):
    model = build(ctx, tiny, fusion).eval()
    seen = {}
    model.fusion.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = tiny.batch(3)
    model(batch)
    if not getattr(model.fusion, "uses_sequences", False):
        assert seen["sequences"] is None
        return
    assert sorted(seen["sequences"]) == list(MODALITIES)
    for seq, mask in seen["sequences"].values():
        assert seq.shape[0] == 3 and seq.shape[:2] == mask.shape and mask.dtype == torch.bool
    assert torch.equal(seen["sequences"]["text"][1], batch["attention_mask"].bool())


def test_late_fusion_logits_are_the_mean_of_per_modality_classifiers(ctx, tiny):
    """Per task, the logits are the mean over present modalities of ``head(branch_m(x_m))``; one present -> its own."""
    model = build(ctx, tiny, "late", tasks={"label": 3, "label_mood": 2}).eval()
    batch = tiny.batch(4)
    batch["audio_present"][0] = batch["text_present"][0] = False  # row 0: image only
    batch["image_present"][1] = False  # row 1: audio + text
    with torch.no_grad():
        out = model(batch)
        per_modality = {m: model.fusion.branches[m](out.embeddings[m]) for m in MODALITIES}
        for task, head in model.heads.items():
            logits = {m: head(h) for m, h in per_modality.items()}
            torch.testing.assert_close(out.logits[task][0], logits["image"][0])
            torch.testing.assert_close(out.logits[task][1], (logits["audio"][1] + logits["text"][1]) / 2)
            torch.testing.assert_close(out.logits[task][2], sum(x[2] for x in logits.values()) / 3)

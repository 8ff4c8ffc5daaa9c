"""Small, seeded building blocks for the model tests: a data context, configs shrunk to test size, batches.

Pretrained-model encoders (``hf_*``) get tiny random-weight models, saved once per session with
``save_pretrained`` exactly like real ones and loaded back by path (nothing is downloaded).
"""
from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_bert, save_tiny_wav2vec2

from mmray.config.schema import ModelConfig
from mmray.models import ENCODERS, FUSIONS, BuildContext

VOCAB, PAD, TEXT_LEN, IMAGE_SIZE, SAMPLE_RATE, AUDIO_SAMPLES = 50, 0, 8, 16, 8000, 2000

# Values that keep every registered component tiny; each config takes the keys it has.
SMALL = {
    "dim": 16, "hidden_dim": 16, "channels": (8, 16), "layers": 1, "heads": 2, "ff_dim": 32,
    "n_mels": 16, "n_fft": 256, "hop_length": 64, "rank": 4, "dropout": 0.0,
}


def small(entry, *, required: dict[str, dict] | None = None, **overrides):
    """The registered component's config with :data:`SMALL` sizes (and ``overrides``) applied.

    ``required`` maps a component name to the keys it cannot do without (``path`` of the ``hf_*`` encoders).
    """
    fields = entry.config.model_fields
    values = {k: v for k, v in {**SMALL, **(required or {}).get(entry.name, {}), **overrides}.items() if k in fields}
    return entry.config(**values)


def small_model_config(fusion: str = "concat", text: str = "transformer", *, required: dict[str, dict] | None = None,
                       **fusion_overrides) -> ModelConfig:
    return ModelConfig(
        encoders={
            "image": small(ENCODERS.entry("cnn")),
            "text": small(ENCODERS.entry(text), required=required),
            "audio": small(ENCODERS.entry("mel_cnn")),
        },
        fusion=small(FUSIONS.entry(fusion), **fusion_overrides),
    )


def make_batch(size: int = 6, seed: int = 0, num_classes: int = 3) -> dict[str, torch.Tensor]:
    """A batch in the pipeline's format: every modality present, right-padded text of varying length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, TEXT_LEN + 1, (size,), generator=g)
    mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (size, TEXT_LEN), generator=g) * mask + PAD * (1 - mask)
    return {
        "image": torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "audio": 0.1 * torch.randn(size, AUDIO_SAMPLES, generator=g),
        "image_present": torch.ones(size, dtype=torch.bool),
        "text_present": torch.ones(size, dtype=torch.bool),
        "audio_present": torch.ones(size, dtype=torch.bool),
        "label": torch.randint(0, num_classes, (size,), generator=g),
    }


# The batch keys holding each modality's content (its ``<m>_present`` mask aside).
KEYS = {"audio": ("audio",), "image": ("image",), "text": ("input_ids", "attention_mask")}


def blank(batch: dict[str, torch.Tensor], modality: str, rows) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` with ``modality`` missing in ``rows`` as the decoder writes it: zeros + present False."""
    out = {k: v.clone() for k, v in batch.items()}
    for key in KEYS[modality]:
        out[key][rows] = PAD if key == "input_ids" else 0
    out[f"{modality}_present"][rows] = False
    return out


@pytest.fixture
def ctx() -> BuildContext:
    return BuildContext(
        vocab_size=VOCAB, pad_token_id=PAD, max_text_length=TEXT_LEN,
        image_size=IMAGE_SIZE, sample_rate=SAMPLE_RATE, audio_samples=AUDIO_SAMPLES,
    )


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random Hugging Face models: ``{"hf_text": tiny BERT, "hf_audio": tiny wav2vec2 at 8 kHz,
    "hf_image": tiny ViT fed IMAGE_SIZE images}``."""
    from helpers import save_tiny_vision

    root = tmp_path_factory.mktemp("hf")
    return {"hf_text": save_tiny_bert(root / "bert"), "hf_audio": save_tiny_wav2vec2(root / "wav2vec2"),
            "hf_image": save_tiny_vision(root / "vit", "vit", IMAGE_SIZE)}


@pytest.fixture
def tiny(tiny_hf):
    """Factories shared by the test files (fixtures, so no test imports another test module)."""
    required = {name: {"path": path} for name, path in tiny_hf.items()}

    class Tiny:
        small = staticmethod(lambda entry, **kw: small(entry, required=required, **kw))
        model_config = staticmethod(lambda *a, **kw: small_model_config(*a, required=required, **kw))
        hf = tiny_hf
        batch = staticmethod(make_batch)
        blank = staticmethod(blank)
        keys = KEYS

    return Tiny

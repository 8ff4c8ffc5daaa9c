"""The model side of the embedding cache: batches that carry precomputed encoder outputs (plain PyTorch).

A batch read from an embedding cache (:mod:`mmray.data.cache`) holds, per cached modality ``m``:

- ``"<m>.pooled"``: float ``[B, D_m]``, the frozen encoder's pooled output in eval mode;
- ``"<m>.sequence"`` / ``"<m>.sequence_mask"``: ``[B, T, D_m]`` / bool ``[B, T]`` when the cache holds sequences.

:class:`~mmray.models.model.MultimodalModel` uses those instead of running the encoder, so the same model,
loop, metrics and export serve both paths; raw inputs still go through the encoders (export, predict).
"""
from __future__ import annotations

import torch
from torch import nn

from mmray.errors import UserError
from mmray.models.encoders.base import EncoderOutput
from mmray.models.hashing import weights_hash


def cached_output(batch: dict[str, torch.Tensor], modality: str, *, needs_sequence: bool) -> EncoderOutput | None:
    """The encoder output of ``modality`` carried by ``batch``, or None when the batch holds raw inputs.

    Raises:
        UserError: the fusion reads sequences but the cache holds only pooled vectors.
    """
    pooled = batch.get(f"{modality}.pooled")
    if pooled is None:
        return None
    sequence = batch.get(f"{modality}.sequence")
    if needs_sequence and sequence is None:
        raise UserError(f"the embedding cache of {modality} holds no sequences but the fusion reads them; "
                        "rebuild it for this fusion or set train.embedding_cache: off")
    mask = batch.get(f"{modality}.sequence_mask")
    return EncoderOutput(pooled, sequence, None if mask is None else mask.to(torch.bool))


def encoder_hashes(model: nn.Module, modalities) -> dict[str, str]:
    """modality -> :func:`weights_hash` of ``model``'s encoder of that modality."""
    return {m: weights_hash(model.encoders[m]) for m in modalities}


def check_cached_encoders(actual: dict[str, str], expected: dict[str, str] | None) -> None:
    """Refuse to train from cached embeddings that another set of encoder weights produced.

    ``actual`` maps modality -> :func:`weights_hash` of this run's encoder (:func:`encoder_hashes`);
    ``expected`` the same for the encoders that filled the cache (None: no cache).

    Raises:
        RuntimeError: an encoder of this run differs from the one the cache was built with.
    """
    for modality, digest in (expected or {}).items():
        if actual.get(modality) != digest:
            raise RuntimeError(
                f"the embedding cache of {modality} was built by different encoder weights "
                f"({digest[:12]} vs this run's {str(actual.get(modality))[:12]}); set train.embedding_cache: off, "
                "or delete the cache folder under the dataset's .cache/embeddings and run again")

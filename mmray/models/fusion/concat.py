"""Early (feature-level) fusion: concatenate modality embeddings, then an MLP."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import mlp, zero_missing
from mmray.registry import ComponentConfig


class ConcatConfig(ComponentConfig):
    """Concatenation of the modality vectors (zeros for a missing modality) followed by an MLP."""

    name: Literal["concat"] = "concat"
    hidden_dim: int = Field(256, gt=0)
    layers: int = Field(1, ge=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


@FUSIONS.register("concat", config=ConcatConfig)
class ConcatFusion(nn.Module):
    """Concatenation (early) fusion + MLP (Baltrusaitis et al., "Multimodal Machine Learning: A Survey", TPAMI 2019).

    Modality vectors are concatenated in sorted modality order, a missing modality contributing zeros, then
    passed through ``layers`` x (Linear(hidden_dim) -> GELU -> Dropout); ``layers=0`` is the bare concatenation.
    ``[B, D_m] per modality -> [B, output_dim]``, ``output_dim = hidden_dim`` (or ``sum(D_m)`` if ``layers=0``).
    """

    def __init__(self, config: ConcatConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.mlp, self.output_dim = mlp(sum(input_dims.values()), config.hidden_dim, config.layers, config.dropout)

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        parts = [zero_missing(embeddings[m], present[m]) for m in self.modalities]
        return self.mlp(torch.cat(parts, dim=-1))

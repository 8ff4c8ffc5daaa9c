"""Tensor fusion: the outer product of every modality's vector extended with a constant 1, then an MLP."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import mlp, zero_missing
from mmray.registry import ComponentConfig


class TensorConfig(ComponentConfig):
    """Tensor Fusion Network: ``dim``-wide projections, their 3-fold outer product, an MLP of ``hidden_dim``."""

    name: Literal["tensor"] = "tensor"
    dim: int = Field(16, gt=0, description="each modality is projected to this width before the outer product")
    hidden_dim: int = Field(128, gt=0, description="width of the MLP after the product (= output)")
    layers: int = Field(2, ge=0, description="Linear -> ReLU -> Dropout blocks after the product (0 = the bare product)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


def tensor_product(vectors: list[torch.Tensor]) -> torch.Tensor:
    """``[z_1 [B, D_1], ..., z_M [B, D_M]]`` -> ``vec([z_1; 1] x ... x [z_M; 1])`` ``[B, prod(D_m + 1)]``.

    The appended 1 keeps every lower-order term: the unimodal ``z_m`` and every pairwise product appear
    in the flattened tensor next to the full M-way products. The first vector varies slowest.
    """
    out = None
    for z in vectors:
        z1 = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        out = z1 if out is None else (out.unsqueeze(2) * z1.unsqueeze(1)).flatten(1)
    return out


@FUSIONS.register("tensor", config=TensorConfig)
class TensorFusion(nn.Module):
    """Tensor Fusion Network (Zadeh et al., "Tensor Fusion Network for Multimodal Sentiment Analysis", EMNLP 2017).

    ``z_m = W_m x_m`` projects each modality to ``dim``; :func:`tensor_product` forms the flattened outer
    product of the ``[z_m; 1]`` (``prod(dim + 1)`` features: 4,913 for three modalities at the default
    16); then ``layers`` x (Linear(hidden_dim) -> ReLU -> Dropout), the paper's inference subnetwork.
    A missing modality's ``z_m`` is zeros, so only the terms that do not involve it survive (its ``1``
    still passes the other modalities' unimodal and cross terms). The product grows exponentially with
    the number of modalities; see ``low_rank_tensor`` for the linear-cost factorisation.
    ``[B, D_m] per modality -> [B, hidden_dim]`` (``[B, prod(dim + 1)]`` if ``layers=0``).
    """

    def __init__(self, config: TensorConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], config.dim) for m in self.modalities})
        width = (config.dim + 1) ** len(self.modalities)
        self.mlp, self.output_dim = mlp(width, config.hidden_dim, config.layers, config.dropout, act=nn.ReLU)

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        # Zero after the projection: a missing z_m must be exactly 0, not the projection's bias.
        z = [zero_missing(self.proj[m](zero_missing(embeddings[m], present[m])), present[m]) for m in self.modalities]
        return self.mlp(tensor_product(z))

"""Low-rank tensor fusion: tensor fusion with its weight tensor factorised into modality-specific factors."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import zero_missing
from mmray.registry import ComponentConfig


class LowRankTensorConfig(ComponentConfig):
    """LMF: a rank-``rank`` factorisation of tensor fusion's weight tensor, output ``hidden_dim`` wide."""

    name: Literal["low_rank_tensor"] = "low_rank_tensor"
    rank: int = Field(4, ge=1, description="number of rank-1 terms in the weight tensor")
    hidden_dim: int = Field(128, gt=0, description="output width")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


@FUSIONS.register("low_rank_tensor", config=LowRankTensorConfig)
class LowRankTensorFusion(nn.Module):
    """Low-rank Multimodal Fusion, LMF (Liu et al., "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors", ACL 2018).

    Tensor fusion computes ``h = W . vec([x_1; 1] x ... x [x_M; 1]) + b``; LMF writes the weight tensor as
    ``W = sum_{i<rank} lambda_i (w_1^i x ... x w_M^i)`` with per-modality factors ``w_m^i [D_m + 1, H]``,
    so ``h = sum_i lambda_i prod_m ([x_m; 1] w_m^i) + b`` costs ``O(rank * H * sum D_m)`` instead of
    ``O(H * prod D_m)``; no tensor is ever formed. A missing modality's ``x_m`` is zeros, so its factor
    reduces to the learned row ``w_m^i[D_m]`` (its "missing" embedding), exactly as in ``tensor`` fusion.
    ``[B, D_m] per modality -> [B, hidden_dim]``.
    """

    def __init__(self, config: LowRankTensorConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        h = config.hidden_dim
        # std 1/sqrt(D_m + 1): each factor's output is O(1) for O(1) inputs, so their product stays O(1)
        # whatever the number of modalities (the paper's Xavier init shrinks it geometrically).
        self.factors = nn.ParameterDict({
            m: nn.Parameter(torch.randn(config.rank, input_dims[m] + 1, h) / math.sqrt(input_dims[m] + 1))
            for m in self.modalities
        })
        self.rank_weights = nn.Parameter(torch.randn(config.rank) / math.sqrt(config.rank))
        self.bias = nn.Parameter(torch.zeros(h))
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = h

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        product = None
        for m in self.modalities:
            x = zero_missing(embeddings[m], present[m])
            x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [B, D_m + 1]
            f = torch.einsum("bd,rdh->brh", x1, self.factors[m])  # [B, rank, H]
            product = f if product is None else product * f
        return self.dropout(torch.einsum("r,brh->bh", self.rank_weights, product) + self.bias)

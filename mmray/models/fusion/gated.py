"""Gated fusion: the gated multimodal unit, generalised to any number of modalities."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import masked_softmax, zero_missing
from mmray.registry import ComponentConfig


class GatedConfig(ComponentConfig):
    """Gated multimodal unit: tanh features of each modality mixed by gates computed from all of them."""

    name: Literal["gated"] = "gated"
    hidden_dim: int = Field(256, gt=0, description="width of each modality's tanh features (= output)")
    gate: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax: per-dimension convex mix over present modalities; sigmoid: independent gates"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


@FUSIONS.register("gated", config=GatedConfig)
class GatedFusion(nn.Module):
    """Gated multimodal unit, GMU (Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR Workshop 2017).

    ``h_m = tanh(W_m x_m)``; gates ``z = W_z [x_1; ...; x_M; p]`` (zero-filled embeddings and the 0/1
    presence flags ``p``) give one gate per modality and output unit; ``out = sum_m g_m * h_m`` with
    ``g = softmax_m(z)`` over the present modalities (``gate="softmax"``: for two modalities exactly the
    paper's ``z h_1 + (1 - z) h_2``) or ``g_m = sigmoid(z_m)`` masked to present ones (``gate="sigmoid"``,
    the paper's multi-modality variant). A missing modality has gate 0; a row with none gives zeros.
    ``[B, D_m] per modality -> [B, hidden_dim]``.
    """

    def __init__(self, config: GatedConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        h, n = config.hidden_dim, len(self.modalities)
        self.features = nn.ModuleDict({m: nn.Linear(input_dims[m], h, bias=False) for m in self.modalities})
        self.gates = nn.Linear(sum(input_dims.values()) + n, n * h)
        self.softmax = config.gate == "softmax"
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = h

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        x = {m: zero_missing(embeddings[m], present[m]) for m in self.modalities}
        mask = torch.stack([present[m] for m in self.modalities], dim=1)  # [B, M]
        h = torch.stack([torch.tanh(self.features[m](x[m])) for m in self.modalities], dim=1)  # [B, M, H]
        flags = mask.to(h.dtype)
        z = self.gates(torch.cat([*x.values(), flags], dim=-1)).view(h.shape)  # [B, M, H]
        mask3 = mask[..., None].expand(h.shape)
        g = masked_softmax(z, mask3, dim=1) if self.softmax else torch.sigmoid(z) * mask3
        return self.dropout((g * h).sum(dim=1))

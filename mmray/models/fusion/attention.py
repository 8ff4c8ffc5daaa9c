"""Attention fusion: a per-sample softmax over the present modalities weighs their projected embeddings."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import masked_softmax, mlp, zero_missing
from mmray.registry import ComponentConfig


class AttentionConfig(ComponentConfig):
    """Weighted sum of projected modality vectors, weights from a masked softmax over learned scores."""

    name: Literal["attention"] = "attention"
    hidden_dim: int = Field(256, gt=0, description="common width the modalities are projected to (= output)")
    heads: int = Field(4, ge=1, description="independent softmaxes, each weighing its own hidden_dim/heads slice")
    layers: int = Field(1, ge=0, description="Linear -> GELU -> Dropout blocks after the weighted sum")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "AttentionConfig":
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a multiple of heads ({self.heads})")
        return self


@FUSIONS.register("attention", config=AttentionConfig)
class AttentionFusion(nn.Module):
    """Modality attention fusion (Hori et al., "Attention-Based Multimodal Fusion for Video Description", ICCV 2017).

    Each modality is projected to ``hidden_dim``: ``h_m = W_m x_m + b_m``; an additive scorer gives
    ``s_m = v^T tanh(U h_m) / sqrt(hidden_dim)`` per sample, modality and head; ``alpha = softmax(s)`` over
    the modalities present in the row (a missing one gets ``-inf``); head ``k``'s slice of the output is
    ``sum_m alpha_mk h_m[k-th slice]`` (``heads=1`` is the paper's single weighted sum), then ``layers`` x
    (Linear -> GELU -> Dropout). A row with no modality gives ``alpha = 0`` (zeros before the MLP), not NaN.
    Hori et al. condition the scores on a decoder state; a classifier has none, so they come from the
    content. ``v`` starts near zero (near-uniform weights): with unscaled, randomly initialised scores the
    softmax saturated on the modality that is useful first (audio on the built-in data) and the run
    stayed at that modality's accuracy (0.36; see benchmarks/RESULTS.md).
    ``[B, D_m] per modality -> [B, hidden_dim]``; :meth:`weights` returns ``alpha [B, M, heads]``.
    """

    def __init__(self, config: AttentionConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        h = config.hidden_dim
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], h) for m in self.modalities})
        self.heads = config.heads
        self.score = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, config.heads, bias=False))
        # Start from near-uniform weights and scale scores by 1/sqrt(h): Adam moves all h weights of a score at
        # once, so unscaled scores saturate the softmax within a few hundred steps, and a modality that is
        # still useless early on (a CNN not yet trained) is switched off for good.
        nn.init.normal_(self.score[-1].weight, std=0.02)  # not 0: U must get gradients too
        self.scale = h ** -0.5
        self.mlp, self.output_dim = mlp(h, h, config.layers, config.dropout)

    def _projected(self, embeddings, present) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [B, M, hidden_dim]`` and the presence mask ``[B, M]``; a missing row's ``h`` gets weight 0."""
        h = torch.stack([self.proj[m](zero_missing(embeddings[m], present[m])) for m in self.modalities], dim=1)
        return h, torch.stack([present[m] for m in self.modalities], dim=1)

    def _alpha(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(h) * self.scale  # [B, M, heads]
        return masked_softmax(scores, mask[..., None].expand_as(scores), dim=1)

    def weights(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """``alpha [B, M, heads]``, modalities in sorted order: per head sums to 1 over a row's present modalities."""
        return self._alpha(*self._projected(embeddings, present))

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        h, mask = self._projected(embeddings, present)
        alpha = self._alpha(h, mask)  # [B, M, heads]
        b, m, d = h.shape
        mixed = (alpha.unsqueeze(-1) * h.view(b, m, self.heads, d // self.heads)).sum(dim=1)  # [B, heads, d/heads]
        return self.mlp(mixed.flatten(1))

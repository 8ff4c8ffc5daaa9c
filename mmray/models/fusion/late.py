"""Late (decision-level) fusion: one classifier per modality, their logits averaged over present modalities."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.models.fusion.base import masked_softmax, zero_missing
from mmray.registry import ComponentConfig


class LateConfig(ComponentConfig):
    """A per-modality MLP ending in a linear layer; the outputs are averaged over the present modalities."""

    name: Literal["late"] = "late"
    hidden_dim: int = Field(128, gt=0, description="width of each modality's MLP and of the output")
    combine: Literal["mean", "learned"] = Field(
        "mean", description="plain mean over present modalities, or learned per-modality weights (softmax)"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


@FUSIONS.register("late", config=LateConfig)
class LateFusion(nn.Module):
    """Late (decision-level) fusion by averaging per-modality scores (Snoek et al., "Early versus late fusion in semantic video analysis", ACM MM 2005).

    Each modality ``m`` gets its own MLP ``g_m``: Linear(hidden_dim) -> GELU -> Dropout -> Linear(hidden_dim),
    and the output is ``sum_m w_m g_m(x_m)`` over the modalities present in the row, with ``w_m = 1/#present``
    (``combine="mean"``) or a softmax over learned per-modality scores renormalised over the present ones
    (``combine="learned"``). The model's task heads are linear, so ``head(sum_m w_m g_m(x_m)) =
    sum_m w_m head(g_m(x_m))``: the logits are exactly the weighted mean of per-modality classifiers'
    logits ``head o g_m`` (one per task), i.e. decision-level fusion, without a second kind of head. Averaging
    logits (not probabilities) multiplies the modalities' evidence, so a label that needs two modalities
    (shape from the image, pitch from the audio) is recoverable. A row with no modality gives zeros.
    ``[B, D_m] per modality -> [B, hidden_dim]``.
    """

    def __init__(self, config: LateConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        h = config.hidden_dim
        self.branches = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(input_dims[m], h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h, h))
            for m in self.modalities
        })
        # Zeros = equal weights at the start, i.e. the plain mean until the data says otherwise.
        self.scores = nn.Parameter(torch.zeros(len(self.modalities))) if config.combine == "learned" else None
        self.output_dim = h

    def modality_outputs(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, M, hidden_dim]``: each modality's branch output in sorted modality order (zeros where missing)."""
        # Zero the inputs too: a NaN in a missing row would otherwise reach the weight gradients.
        return torch.stack([zero_missing(self.branches[m](zero_missing(embeddings[m], present[m])), present[m])
                            for m in self.modalities], dim=1)

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences=None) -> torch.Tensor:
        mask = torch.stack([present[m] for m in self.modalities], dim=1)  # [B, M]
        outs = self.modality_outputs(embeddings, present)
        scores = self.scores if self.scores is not None else torch.zeros(len(self.modalities), device=mask.device)
        weights = masked_softmax(scores.expand(mask.shape), mask, dim=1)  # [B, M]; equal scores = mean
        return (weights.unsqueeze(-1) * outs).sum(dim=1)

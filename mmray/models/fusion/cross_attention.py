"""Cross-modal attention fusion: one Transformer over the tokens of every modality, read out at a [CLS] token."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mmray.models.fusion import FUSIONS
from mmray.registry import ComponentConfig


class CrossAttentionConfig(ComponentConfig):
    """A small Transformer encoder over [CLS] + every modality's tokens (each tagged with a modality embedding)."""

    name: Literal["cross_attention"] = "cross_attention"
    hidden_dim: int = Field(128, gt=0, description="token width (d_model) = output width")
    layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    ff_dim: int = Field(256, gt=0)
    # Few, short: on the built-in data (6 epochs) 16 tokens per modality or 2 layers stayed near the audio-only
    # accuracy (0.35-0.47) while 1 token per modality and 1 layer reached 0.62 (benchmarks/RESULTS.md).
    max_tokens: int = Field(1, ge=1, description="per modality: longer sequences are average-pooled down to this")
    pool: Literal["cls", "mean"] = Field("cls", description="read out the [CLS] token, or the mean over real tokens")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "CrossAttentionConfig":
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a multiple of heads ({self.heads})")
        return self


def cap_tokens(seq: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``seq [B, T, D]``, ``mask [B, T]`` -> at most ``n`` tokens: masked averages over ``n`` equal windows.

    A pooled token is real if any token in its window was; padding never enters an average.
    """
    if seq.shape[1] <= n:
        return seq, mask
    x = torch.where(mask[..., None], seq, 0.0).transpose(1, 2)  # [B, D, T], padding zeroed
    total = F.adaptive_avg_pool1d(x, n)  # [B, D, n]: sum over a window's real tokens / window length
    count = F.adaptive_avg_pool1d(mask.to(seq.dtype).unsqueeze(1), n)  # [B, 1, n]: fraction of real tokens
    return (total / count.clamp(min=1e-6)).transpose(1, 2), count.squeeze(1) > 0


@FUSIONS.register("cross_attention", config=CrossAttentionConfig)
class CrossAttentionFusion(nn.Module):
    """Single-stream cross-modal Transformer fusion, as in ViLT (Kim et al., "ViLT: Vision-and-Language Transformer Without Convolution or Region Supervision", ICML 2021).

    Tokens: a learned [CLS]; per modality its pooled vector and, when the encoder gives one, its sequence
    (``uses_sequences``: the model passes ``sequences[m] = (Tensor [B, T, D_m], mask [B, T])``; sequences
    longer than ``max_tokens`` are average-pooled down), each projected to ``hidden_dim`` plus a learned
    modality-type embedding. A pre-norm ``nn.TransformerEncoder`` attends over them with a key padding
    mask (padding, and every token of a modality missing in that row); the output is the final-normed
    [CLS] state (``pool="cls"``, as ViLT) or the mean over real tokens. [CLS] is always real, so a row with
    no modality stays finite. ViLT uses 12 layers of width 768; the defaults here are sized for small
    encoders and a short budget (see the comment on ``max_tokens``). ``[B, D_m] -> [B, hidden_dim]``.
    """

    uses_sequences = True

    def __init__(self, config: CrossAttentionConfig, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        d = config.hidden_dim
        self.max_tokens = config.max_tokens
        self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], d) for m in self.modalities})
        self.type_embedding = nn.Parameter(torch.randn(len(self.modalities), d) * 0.02)
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, config.heads, config.ff_dim, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.pool = config.pool
        self.output_dim = d

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        b = next(iter(embeddings.values())).shape[0]
        tokens, real = [self.cls.expand(b, 1, -1)], [torch.ones(b, 1, dtype=torch.bool, device=self.cls.device)]
        for i, m in enumerate(self.modalities):
            x, mask = embeddings[m].unsqueeze(1), present[m].unsqueeze(1)  # the pooled vector: one token
            if sequences and m in sequences:
                seq, seq_mask = cap_tokens(*sequences[m], self.max_tokens)
                x, mask = torch.cat([x, seq], dim=1), torch.cat([mask, seq_mask & present[m][:, None]], dim=1)
            # Zero missing content: a masked key gets weight 0, but 0 * NaN would still be NaN.
            tokens.append(self.proj[m](torch.where(mask[..., None], x, 0.0)) + self.type_embedding[i])
            real.append(mask)
        real = torch.cat(real, dim=1)
        h = self.encoder(torch.cat(tokens, dim=1), src_key_padding_mask=~real)
        if self.pool == "cls":
            return h[:, 0]
        w = real.unsqueeze(-1).to(h.dtype)  # [CLS] is real: a row with no modality averages [CLS] alone
        return (h * w).sum(dim=1) / w.sum(dim=1)

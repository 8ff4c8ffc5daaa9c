"""Helpers every fusion shares: zero-filling missing modalities, a softmax over present ones only, MLP stacks."""
from __future__ import annotations

import torch
from torch import nn


def mlp(width: int, hidden: int, layers: int, dropout: float, act: type[nn.Module] = nn.GELU) -> tuple[nn.Sequential, int]:
    """``layers`` x (Linear -> act -> Dropout) from ``width`` to ``hidden``; returns it and its output width
    (``width`` itself when ``layers`` is 0: an identity)."""
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), act(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*blocks), width


def zero_missing(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``x [B, ...]`` with the rows where ``present [B]`` is False set to zeros.

    ``where()``, not a multiply: a missing row's content must not leak in, even as ``NaN * 0``.
    """
    return torch.where(present.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to where ``mask`` (same shape, bool) is True.

    Masked positions get exactly 0; a slice with no True position gives all zeros (not NaN), so a row
    with every modality missing contributes nothing instead of poisoning the batch.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    # An all -inf slice would softmax to NaN: give it finite scores, then zero it with the mask.
    any_real = mask.any(dim=dim, keepdim=True)
    scores = torch.where(any_real, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return torch.softmax(scores, dim=dim) * mask

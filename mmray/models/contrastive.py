"""CLIP-style contrastive alignment of modality embeddings (plain PyTorch).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021):
L2-normalised projections, cosine similarities scaled by a learned ``1 / temperature`` (stored as its log,
initialised to ``log(1 / 0.07)``, clamped to at most 100), and a symmetric cross-entropy whose targets are
the matching rows. Negatives are the other rows of the batch; with several workers, of the global batch:
every worker gathers the others' projections (OpenCLIP's ``gather_with_grad=False``), so a run on W workers
optimises the same loss, with the same gradients, as one worker on all W batches together.
"""
from __future__ import annotations

import itertools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Collective(Protocol):
    """What the head needs from distributed training (the loop's worker context provides it)."""

    rank: int
    world_size: int

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's ``t`` (same shape on all), in rank order; no gradient."""
        ...


def global_rows(local: dict[str, torch.Tensor], present: dict[str, torch.Tensor], collective: Collective):
    """The projections and presence masks of every worker's rows, concatenated in rank order.

    Batches may differ in size (the last one of an epoch): each is padded to the largest, padded rows marked
    absent. This worker's rows keep their gradient, scaled by ``world_size``: the loss is the same on every
    worker and DDP averages gradients, so each worker must contribute the whole gradient of its own rows.
    """
    w, r = collective.world_size, collective.rank
    n = next(iter(local.values())).shape[0]
    sizes = collective.all_gather(torch.tensor([n], device=next(iter(local.values())).device))
    most = int(max(int(s.item()) for s in sizes))
    z, mask = {}, {}
    for m, v in local.items():
        padded = F.pad(v, (0, 0, 0, most - n))
        keep = F.pad(present[m].to(torch.uint8), (0, most - n))  # uint8: every backend gathers it
        mine = padded * w - padded.detach() * (w - 1)  # value unchanged; gradient x world_size
        chunks = collective.all_gather(padded.detach().contiguous())
        z[m] = torch.cat(chunks[:r] + [mine] + chunks[r + 1:])
        mask[m] = torch.cat(collective.all_gather(keep.contiguous())).to(torch.bool)
    return z, mask


class ContrastiveHead(nn.Module):
    """Per-modality projections and the temperature of an InfoNCE loss over every modality pair.

    Args:
        input_dims: modality -> its encoder's pooled width ``D_m``.
        projection_dim: width of the shared space; ``None`` = no projection when every ``D_m`` is equal,
            else linear projections to the smallest ``D_m``.
        temperature: initial temperature (CLIP: 0.07).
        learn_temperature: train the temperature (else a fixed buffer).
        max_logit_scale: ``1 / temperature`` is clamped to at most this (CLIP: 100).
    """

    def __init__(self, input_dims: dict[str, int], *, projection_dim: int | None = None, temperature: float = 0.07,
                 learn_temperature: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        self.modalities = sorted(input_dims)
        widths = set(input_dims.values())
        if projection_dim is None and len(widths) == 1:
            self.proj = nn.ModuleDict({m: nn.Identity() for m in self.modalities})
        else:
            d = projection_dim or min(widths)
            self.proj = nn.ModuleDict({m: nn.Linear(input_dims[m], d, bias=False) for m in self.modalities})
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.log_scale.detach().clamp(max=self.max_log_scale).exp())

    def forward(self, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                collective: Collective | None = None) -> torch.Tensor:
        """Mean over modality pairs of the symmetric InfoNCE loss; a scalar.

        Args:
            embeddings: modality -> ``[B, D_m]``.
            present: modality -> bool ``[B]``; a pair only compares the rows where both are present.
            collective: with more than one worker, negatives come from every worker's batch (:func:`global_rows`).

        A pair with fewer than two such rows is left out (nothing to contrast); with no pair left the loss is
        0, still connected to every parameter so that distributed gradient reduction stays in step.
        """
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        z = {m: F.normalize(self.proj[m](embeddings[m].float()), dim=-1) for m in self.modalities}
        if collective is not None and collective.world_size > 1:
            z, present = global_rows(z, present, collective)
        # 0 * everything: keeps every projection and the temperature in the graph even when no pair counts.
        total = scale * 0.0 + sum(v.sum() * 0.0 for v in z.values())
        pairs = 0
        for a, b in itertools.combinations(self.modalities, 2):
            both = present[a] & present[b]
            za, zb = z[a][both], z[b][both]
            n = za.shape[0]
            if n < 2:
                continue
            logits = scale * za @ zb.T  # [n, n]; row i's match is column i
            target = torch.arange(n, device=logits.device)
            total = total + 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            pairs += 1
        return total / max(pairs, 1)

"""The multimodal model: one encoder per modality -> a fusion -> one classification head per task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from mmray.errors import UserError
from mmray.models.cached import cached_output
from mmray.models.encoders import ENCODERS, BuildContext
from mmray.models.fusion import FUSIONS

if TYPE_CHECKING:  # the schema imports the registries, which import this package
    from mmray.config.schema import ModelConfig

KNOWN_MODALITIES = ("audio", "image", "text")


@dataclass
class ModelOutput:
    """What :meth:`MultimodalModel.forward` returns.

    Attributes:
        logits: task -> ``[B, C_task]`` unnormalised class scores.
        embeddings: modality -> ``[B, D_m]`` pooled encoder output (before missing rows are zeroed).
        fused: ``[B, F]`` the fusion output the heads read (``F`` = ``fusion.output_dim``).
        sequences: what a sequence fusion read (modality -> ``([B, T, D_m], [B, T] bool)``), else ``None``.
    """

    logits: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor]
    fused: torch.Tensor
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


class MultimodalModel(nn.Module):
    """Encoders (``nn.ModuleDict`` by modality) -> fusion -> heads (``nn.ModuleDict`` by task).

    ``forward(batch)`` reads each modality's inputs and its ``<modality>_present`` bool ``[B]`` mask (all
    True when the key is absent); the fusion ignores a modality in the rows where it is not present.
    A fusion with ``uses_sequences = True`` also gets the encoders' per-token outputs. A batch read from the
    embedding cache carries ``<modality>.pooled`` (and sequences) instead of raw inputs: those encoders are
    skipped (see :mod:`mmray.models.cached`).
    ``contrastive`` is a :class:`~mmray.models.contrastive.ContrastiveHead` when the job trains with the
    contrastive objective (its projections and temperature are saved with the weights), else ``None``.
    """

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.modalities: tuple[str, ...] = tuple(sorted(encoders))
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.heads = nn.ModuleDict(heads)
        self.contrastive: nn.Module | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        encoded = {m: self._encode(m, batch) for m in self.modalities}
        embeddings = {m: e.pooled for m, e in encoded.items()}
        sequences = None
        if getattr(self.fusion, "uses_sequences", False):
            sequences = {m: (e.sequence, e.sequence_mask) for m, e in encoded.items() if e.sequence is not None}
        return self.fuse(batch, embeddings, sequences)

    def fuse(self, batch: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor],
             sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ModelOutput:
        """Fusion and heads on given modality embeddings (``[B, D_m]`` each): the second half of ``forward``."""
        fused = self.fusion(embeddings, self.present_masks(batch, embeddings), sequences=sequences)
        return ModelOutput({t: head(fused) for t, head in self.heads.items()}, embeddings, fused, sequences)

    def _encode(self, modality: str, batch: dict[str, torch.Tensor]):
        uses_sequences = getattr(self.fusion, "uses_sequences", False)
        cached = cached_output(batch, modality, needs_sequence=uses_sequences)
        return cached if cached is not None else self.encoders[modality](batch)

    def present_masks(
        self, batch: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """modality -> bool ``[B]``: the batch's ``<m>_present`` column, or all True without one."""
        masks = {}
        for m, emb in embeddings.items():
            key = f"{m}_present"
            masks[m] = (
                batch[key].to(device=emb.device, dtype=torch.bool) if key in batch
                else torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
            )
        return masks


def build_model(
    model: ModelConfig, *, modalities: Iterable[str], tasks: dict[str, int], ctx: BuildContext
) -> MultimodalModel:
    """Build the model a job config describes.

    Args:
        model: the job's ``model`` section.
        modalities: the modalities to encode (``data.modalities``); iterated in sorted order.
        tasks: task name -> number of classes; the main task is ``"label"``.
        ctx: data facts the encoders need (vocabulary, text length, image size, audio rate and length).

    Raises:
        UserError: no or unknown modalities, no tasks, a task with fewer than 2 classes, or an encoder that
            cannot be built for the data (e.g. an image too small for its CNN).
    """
    mods = tuple(sorted(set(modalities)))
    unknown = [m for m in mods if m not in KNOWN_MODALITIES]
    if not mods or unknown:
        raise UserError(f"data.modalities: {list(mods)} must be a non-empty subset of {list(KNOWN_MODALITIES)}")
    if not tasks:
        raise UserError("a model needs at least one task (the dataset's 'label')")
    for task, n in tasks.items():
        if n < 2:
            raise UserError(f"task {task!r} has {n} class(es); classification needs at least 2")
    encoders = {m: ENCODERS.build(getattr(model.encoders, m), ctx=ctx) for m in mods}
    fusion = FUSIONS.build(model.fusion, input_dims={m: e.output_dim for m, e in encoders.items()})
    heads = {
        t: nn.Sequential(nn.Dropout(model.head_dropout), nn.Linear(fusion.output_dim, n))
        for t, n in sorted(tasks.items())
    }
    return MultimodalModel(encoders, fusion, heads)

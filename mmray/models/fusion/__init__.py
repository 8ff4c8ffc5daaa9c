"""Fusion methods, registered by name in :data:`FUSIONS`.

A fusion is an ``nn.Module`` built as ``Fusion(config, input_dims: dict[str, int])`` with an
``output_dim`` attribute and ``forward(embeddings: dict[str, Tensor [B, D_m]], present: dict[str, Tensor [B] bool],
sequences=None) -> Tensor [B, output_dim]``. Modalities are iterated in sorted order. In a row where
``present[m]`` is False the output must not depend on ``embeddings[m]`` (masked, or replaced by something
learned), and a row with no modality present must stay finite.

A fusion that sets the class attribute ``uses_sequences = True`` also gets ``sequences: dict[str,
(Tensor [B, T, D_m], Tensor [B, T] bool)]``, the encoders' per-token outputs (modalities whose encoder has
none are left out); every other fusion gets ``None``.
"""
from mmray.registry import Registry

FUSIONS: Registry = Registry("fusion")

from mmray.models.fusion import (  # noqa: E402,F401  (registers the built-ins)
    attention,
    concat,
    cross_attention,
    gated,
    late,
    low_rank_tensor,
    tensor,
)

__all__ = ["FUSIONS"]

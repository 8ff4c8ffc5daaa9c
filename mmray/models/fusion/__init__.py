"""Fusion methods, registered by name in :data:`FUSIONS`.

A fusion is an ``nn.Module`` built as ``Fusion(config, input_dims: dict[str, int])`` with an
``output_dim`` attribute and ``forward(embeddings: dict[str, Tensor [B, D_m]], present: dict[str, Tensor [B] bool])
-> Tensor [B, output_dim]``. Modalities are iterated in sorted order.
"""
from mmray.registry import Registry

FUSIONS: Registry = Registry("fusion")

from mmray.models.fusion import concat  # noqa: E402,F401  (registers the built-ins)

__all__ = ["FUSIONS"]

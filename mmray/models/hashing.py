"""Content hashes of weights: what slim checkpoints, LoRA bases and the embedding cache check encoders by."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_hash(module: nn.Module) -> str:
    """sha256 over ``module``'s parameters and buffers (names, dtypes, shapes, bytes), in name order."""
    return tensors_hash(module.state_dict())


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()

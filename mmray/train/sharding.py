"""Sharded data parallel (``scaling.strategy: fsdp``): the wrap the loop applies instead of DDP's. Plain PyTorch.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter, its gradient and its optimizer state
across the workers (each holds about ``1 / num_workers`` of them) and gathers a group's parameters just before
the group runs. The groups, innermost first:

- each block of every encoder: the elements of the outermost ``nn.ModuleList`` inside it (the transformer
  layers of a Hugging Face or built-in Transformer encoder, a wav2vec2's conv and transformer layers);
- each encoder, for what its blocks leave (embeddings, projections, pooler);
- the whole model, for the fusion, the heads and the contrastive projections.

So at most one encoder block is gathered at a time besides the small root. LoRA adapters and activation
checkpointing compose: adapters are parameters of the blocks that hold them (frozen base weights are sharded
too and take no gradient), and a checkpointed block is gathered again when it is recomputed.

Mixed precision follows ``train.precision``: where it means bf16 (``bf16``, or ``auto`` on a GPU that
supports it) the gathered parameters and the forward run in bf16 and gradients are reduced in fp32
(``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``); the sharded master weights and the
optimizer state stay fp32. ``fp16`` is refused with fsdp at config validation (its loss scaling is not
supported on sharded gradients here), and ``auto`` on a GPU without bf16 (which would mean fp16) when the
run starts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmray.config.errors import RunError
from mmray.train.evaluation import autocast_dtype


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the module inside a compile wrapper) was sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    return isinstance(inner, FSDPModule)


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``encoder``: the elements holding parameters of each outermost ``nn.ModuleList``
    (a ModuleList inside another one, or inside a block, is part of that block)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(b for b in child if any(True for _ in b.parameters()))
            else:
                visit(child)

    visit(encoder)
    return blocks


def mixed_precision(precision: str, device: torch.device):
    """The ``MixedPrecisionPolicy`` for ``train.precision`` on ``device``: bf16 parameters with fp32 gradient
    reduction where the loop autocasts to bf16; None (everything fp32) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if autocast_dtype(precision, device) != torch.bfloat16:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` moved to ``device`` and sharded in place across the default process group (see the module
    docstring); every rank ends up with rank 0's weights, as DDP's wrap would give them.

    Raises:
        RunError: no process group with two or more ranks (sharding needs one), or fp16 autocast.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise RunError("scaling.strategy: 'fsdp' needs a process group of two or more workers")
    if autocast_dtype(precision, device) == torch.float16:  # auto on a GPU without bf16 (fp16 is refused earlier)
        raise RunError(f"train.precision: {precision!r} means fp16 on this GPU (it has no bf16), which "
                       "scaling.strategy: 'fsdp' does not support; set train.precision: fp32, or scaling.strategy: ddp")
    model = model.to(device)
    with torch.no_grad():  # each rank built its own random initialisation: start from rank 0's, as DDP does
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    kwargs = {}
    policy = mixed_precision(precision, device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for encoder in getattr(model, "encoders", {}).values():
        for block in encoder_blocks(encoder):
            fully_shard(block, **kwargs)
        if any(True for _ in encoder.parameters()):
            fully_shard(encoder, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_parameters(model: nn.Module) -> tuple[int, int]:
    """``(held here, in the whole model)``: parameter counts of this rank's shards and of the full model."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held, total


def shares_line(held: list[int], total: int) -> str:
    """The run-log line saying how the parameters are spread: ``fsdp: rank 0 holds 50.1% of 1.2M parameters,
    rank 1 49.9%`` (``held``: each rank's count, in rank order)."""
    shares = [100.0 * h / max(total, 1) for h in held]
    rest = ", ".join(f"rank {r} {s:.1f}%" for r, s in enumerate(shares) if r > 0)
    return (f"fsdp: rank 0 holds {shares[0]:.1f}% of {_count(total)} parameters"
            + (f", {rest}" if rest else "") + f" (sharded over {len(held)} workers)")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

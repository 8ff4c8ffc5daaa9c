"""Training checkpoints: weights as safetensors plus the state needed to resume.

A checkpoint folder holds ``model.safetensors`` (the unwrapped model's weights), ``state.pt``
(optimizer, LR schedule, grad scaler, epoch, early-stopping state; a torch pickle, read back
only by mmray itself) and ``config.yaml`` (the resolved job config that produced it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmray.config import JobConfig, to_yaml

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; clone makes each tensor its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}


@dataclass
class TrainState:
    """Everything beyond the weights that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: JobConfig,
) -> str:
    os.makedirs(path, exist_ok=True)
    save_file(state_dict_for_saving(model), os.path.join(path, WEIGHTS))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_state": state.__dict__,
        },
        os.path.join(path, STATE),
    )
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(to_yaml(config))
    return path


def load_weights(path: str, model: nn.Module) -> None:
    unwrap(model).load_state_dict(load_file(os.path.join(path, WEIGHTS)))


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler) -> TrainState:
    """Restore weights and optimizer/schedule state in place; returns the saved :class:`TrainState`."""
    load_weights(path, model)
    blob = torch.load(os.path.join(path, STATE), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    return TrainState(**blob["train_state"])

"""Image encoders."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmray.config.errors import UserError
from mmray.models.encoders import ENCODERS
from mmray.models.encoders.base import BuildContext, EncoderOutput, conv_block
from mmray.registry import ComponentConfig


class CNNConfig(ComponentConfig):
    """A small convolutional image encoder trained from scratch."""

    name: Literal["cnn"] = "cnn"
    channels: tuple[int, ...] = Field((32, 64, 128), min_length=1)
    dim: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pool: Literal["max", "avg"] = Field(
        "max", description="global pooling of the last feature map; max learns shape detectors much faster"
    )


@ENCODERS.register("cnn", config=CNNConfig, modality="image")
class ImageCNN(nn.Module):
    """Small CNN image encoder: conv-BN-ReLU-pool blocks, global max (or average) pool, linear to ``dim``.

    Reads ``batch["image"]`` float ``[B, 3, S, S]`` (``S`` = ``ctx.image_size``). Returns ``pooled [B, D]`` and,
    for attention-style fusions, the last feature map as ``H*W`` tokens ``sequence [B, H*W, D]`` (all real).

    Raises:
        UserError: if the image is too small for the number of blocks (each halves the side).
    """

    def __init__(self, config: CNNConfig, ctx: BuildContext):
        super().__init__()
        side = ctx.image_size // 2 ** len(config.channels)
        if side < 1:
            raise UserError(
                f"model.encoders.image.channels: {len(config.channels)} blocks halve a {ctx.image_size}px image "
                f"below 1px; use at most {max(ctx.image_size.bit_length() - 1, 1)} blocks or a larger data.image.size"
            )
        widths = (3, *config.channels)
        self.blocks = nn.Sequential(*(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.proj = nn.Linear(config.channels[-1], config.dim)
        self.pool = config.pool
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = config.dim

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        fmap = self.blocks(batch["image"]).flatten(2)  # [B, C, H*W]
        # Global max pooling keeps "is there a corner / an edge anywhere" features; an average over a
        # mostly-background map dilutes them (on the built-in shapes avg pooling barely learns).
        pooled = fmap.amax(dim=2) if self.pool == "max" else fmap.mean(dim=2)  # [B, C]
        tokens = self.proj(fmap.transpose(1, 2))  # [B, H*W, D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(self.dropout(self.proj(pooled)), self.dropout(tokens), mask)

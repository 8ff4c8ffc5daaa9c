"""Image encoders."""
from __future__ import annotations

import os
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from mmray.errors import UserError
from mmray.models.encoders import ENCODERS
from mmray.models.encoders.base import BuildContext, EncoderConfig, EncoderOutput, conv_block


class CNNConfig(EncoderConfig):
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


# ----------------------------------------------------------------------------------------- ResNet
class ResNetConfig(EncoderConfig):
    """Keys shared by the torchvision ResNets (``resnet18``, ``resnet34``, ``resnet50``)."""

    name: Literal["resnet18", "resnet34", "resnet50"]
    weights: Optional[str] = Field(
        None,
        description="local .pth / .safetensors state dict of the torchvision model (e.g. ImageNet weights); "
        "null = random init. Pretrained weights expect data.image.mean/std = ImageNet's",
    )
    dim: int = Field(256, gt=0, description="the pooled 512-d (2048-d for resnet50) features are projected to dim")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def _path_fields(cls) -> tuple[str, ...]:
        return ("weights",)

    def check_files(self, key: str) -> None:
        if self.weights is not None and not os.path.isfile(os.path.expanduser(self.weights)):
            raise UserError(f"{key}.weights: {self.weights}: not found (a local .pth or .safetensors state dict)")


class ResNet18Config(ResNetConfig):
    """ResNet-18 (torchvision, 11M params, 512-d features); pretrained weights from a local file via `weights`."""

    name: Literal["resnet18"] = "resnet18"


class ResNet34Config(ResNetConfig):
    """ResNet-34 (torchvision, 21M params, 512-d features); pretrained weights from a local file via `weights`."""

    name: Literal["resnet34"] = "resnet34"


class ResNet50Config(ResNetConfig):
    """ResNet-50 (torchvision, 24M params, 2048-d features); pretrained weights from a local file via `weights`."""

    name: Literal["resnet50"] = "resnet50"


def load_state_dict_file(path: str, key: str) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` file or a ``.pth``/``.pt`` torch file (tensors only).

    A ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common training checkpoints) is unwrapped,
    and a DDP ``module.`` prefix is dropped.

    Raises:
        UserError: naming ``key`` and ``path`` if the file is missing or unreadable.
    """
    if not os.path.isfile(path):
        raise UserError(f"{key}: {path}: not found (a local .pth or .safetensors state dict)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            # weights_only: a .pth is a pickle; never run code from a weights file.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / safetensors header errors: all mean "not a state dict"
        raise UserError(f"{key}: {path}: cannot read a state dict: {e}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}: {path}: expected a state dict (parameter name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


@ENCODERS.register("resnet18", config=ResNet18Config, modality="image")
@ENCODERS.register("resnet34", config=ResNet34Config, modality="image")
@ENCODERS.register("resnet50", config=ResNet50Config, modality="image")
class ResNetEncoder(nn.Module):
    """torchvision ResNet image encoder: residual trunk, global average pool, linear to ``dim``.

    Reads ``batch["image"]`` float ``[B, 3, S, S]``. Returns ``pooled [B, D]`` and the last feature map as
    ``H*W`` tokens ``sequence [B, H*W, D]`` (all real; ``H = W = ceil(S / 32)``). The classifier (``fc``) of
    the torchvision model is dropped; a weights file may still contain it.

    Raises:
        UserError: ``weights`` is missing, unreadable, or does not fit the architecture (names
            ``model.encoders.image.weights``).
    """

    def __init__(self, config: ResNetConfig, ctx: BuildContext):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, config.name)(weights=None)
        width = self.net.fc.in_features
        if config.weights is not None and ctx.pretrained:
            self._load(config.weights)
        # The trunk is run by hand in forward (the sequence needs the map before pooling): drop the unused parts.
        self.net.fc, self.net.avgpool = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(width, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = config.dim

    def _load(self, path: str) -> None:
        key = "model.encoders.image.weights"
        state = {k: v for k, v in load_state_dict_file(path, key).items() if not k.startswith("fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(
                f"{key}: {path} does not fit {type(self.net).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (expected a torchvision state dict of the same architecture)"
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(batch["image"]))))
        fmap = n.layer4(n.layer3(n.layer2(n.layer1(x)))).flatten(2)  # [B, C, H*W]
        # One projection serves both outputs: mean over tokens of proj(x) == proj(average-pool(x)).
        tokens = self.proj(fmap.transpose(1, 2))  # [B, H*W, D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(self.dropout(tokens.mean(dim=1)), self.dropout(tokens), mask)

"""What every encoder takes and returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the schema imports the registries, which import this module
    from mmray.config.schema import DataConfig


@dataclass(frozen=True)
class BuildContext:
    """Facts about the data an encoder needs at construction time (from the dataset and data config)."""

    vocab_size: int = 0
    pad_token_id: int = 0
    max_text_length: int = 32
    image_size: int = 32
    sample_rate: int = 8000
    audio_samples: int = 8000

    @classmethod
    def from_config(cls, data: DataConfig, *, vocab_size: int, pad_token_id: int) -> BuildContext:
        """The context for ``data`` with the tokenizer's vocabulary size and pad id (0, 0 without text)."""
        return cls(
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            max_text_length=data.text.max_length,
            image_size=data.image.size,
            sample_rate=data.audio.sample_rate,
            audio_samples=data.audio.num_samples,
        )


@dataclass
class EncoderOutput:
    """One modality's encoding.

    Attributes:
        pooled: ``[B, D]`` one vector per sample (``D`` = the encoder's ``output_dim``).
        sequence: ``[B, T, D]`` per-token / per-frame features, or ``None`` if the encoder has none.
        sequence_mask: ``[B, T]`` bool, True where ``sequence`` holds a real token/frame.
    """

    pooled: torch.Tensor
    sequence: torch.Tensor | None = None
    sequence_mask: torch.Tensor | None = None


def conv_block(in_ch: int, out_ch: int) -> torch.nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool: halves H and W. ``[B, in_ch, H, W] -> [B, out_ch, H/2, W/2]``."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
        torch.nn.BatchNorm2d(out_ch),
        torch.nn.ReLU(inplace=True),
        torch.nn.MaxPool2d(2),
    )


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T, D]`` over the positions where ``mask [B, T]`` is True -> ``[B, D]``.

    A row with no True position gives zeros (not NaN): that is how missing text is encoded.
    """
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

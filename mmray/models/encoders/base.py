"""What every encoder takes and returns."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from pydantic import Field, ValidationInfo, field_validator

from mmray.errors import UserError
from mmray.hf_local import looks_local
from mmray.registry import ComponentConfig

if TYPE_CHECKING:  # the schema imports the registries, which import this module
    from mmray.config.schema import DataConfig


class EncoderConfig(ComponentConfig):
    """Base of every encoder's config: what the training loop does with the encoder's parameters.

    The loop reads these; the encoder itself always builds trainable parameters. Subclasses declare
    ``name: Literal["<name>"]`` and their own architecture keys.

    Attributes:
        freeze: train no parameter of this encoder (a fixed feature extractor, e.g. a pretrained model).
        unfreeze_after_epochs: with ``freeze``, keep the encoder frozen for this many epochs, then train it
            (warm up the fusion and heads on fixed features first); null = frozen for the whole run.
        lr_mult: this encoder's learning rate is ``train.optimizer.lr * lr_mult`` (discriminative
            fine-tuning: e.g. 0.1 for a pretrained encoder under freshly initialised heads).
    """

    freeze: bool = Field(False, description="no gradient updates to this encoder's parameters")
    unfreeze_after_epochs: Optional[int] = Field(
        None, ge=1, description="with freeze: true, train the encoder after this many frozen epochs; null = never",
    )
    lr_mult: float = Field(1.0, gt=0, description="learning-rate multiplier of this encoder (discriminative fine-tuning)")

    @field_validator("unfreeze_after_epochs")
    @classmethod
    def _needs_freeze(cls, v: int | None, info: ValidationInfo) -> int | None:
        # ``freeze`` is declared first, so it is in ``info.data`` unless it failed its own validation.
        if v is not None and "freeze" in info.data and not info.data["freeze"]:
            raise ValueError(f"{v} needs freeze: true in the same encoder section (frozen for {v} epochs, then trained)")
        return v

    def absolute_paths(self) -> "EncoderConfig":
        """This config with its local file paths made absolute (Ray workers run in another directory).

        Encoders that read files (pretrained weights, model folders) override :meth:`_path_fields`.
        """
        update = {k: _absolute(getattr(self, k)) for k in self._path_fields() if getattr(self, k) is not None}
        return self.model_copy(update=update) if update else self

    @classmethod
    def _path_fields(cls) -> tuple[str, ...]:
        return ()

    def check_files(self, key: str) -> None:
        """The local files this encoder reads are there; checked before Ray starts (``key``: its dotted section).

        Raises:
            UserError: naming ``key.<field>``, the path and "not found".
        """
        for field in self._path_fields():
            path = getattr(self, field)
            if path is not None and not os.path.exists(os.path.expanduser(path)):
                raise UserError(f"{key}.{field}: {path}: not found")


def _absolute(path: str) -> str:
    """``path`` made absolute if it names something on the local disk; URIs and hub names unchanged."""
    return os.path.abspath(os.path.expanduser(path)) if looks_local(path) else path


@dataclass(frozen=True)
class BuildContext:
    """Facts about the data an encoder needs at construction time (from the dataset and data config).

    ``pretrained=False`` builds pretrained encoders (``resnet*`` with ``weights``, ``hf_*``) without reading
    their weights files: for when a checkpoint or an export's ``model.safetensors`` is loaded next anyway.
    ``hf_*`` encoders still read the model's ``config.json`` to know the architecture.
    """

    vocab_size: int = 0
    pad_token_id: int = 0
    max_text_length: int = 32
    image_size: int = 32
    sample_rate: int = 8000
    audio_samples: int = 8000
    pretrained: bool = True

    @classmethod
    def from_config(
        cls, data: DataConfig, *, vocab_size: int, pad_token_id: int, pretrained: bool = True
    ) -> BuildContext:
        """The context for ``data`` with the tokenizer's vocabulary size and pad id (0, 0 without text)."""
        return cls(
            pretrained=pretrained,
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

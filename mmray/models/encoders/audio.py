"""Audio encoders over fixed-length waveforms."""
from __future__ import annotations

from typing import Literal

import torch
import torchaudio
from pydantic import Field
from torch import nn

from mmray.errors import UserError
from mmray.models.encoders import ENCODERS
from mmray.models.encoders.base import BuildContext, EncoderConfig, EncoderOutput, conv_block


class MelCNNConfig(EncoderConfig):
    """Log-mel spectrogram (torchaudio, computed on the model's device) + a small 2-D CNN."""

    name: Literal["mel_cnn"] = "mel_cnn"
    n_mels: int = Field(64, gt=0)
    n_fft: int = Field(512, gt=0)
    hop_length: int = Field(128, gt=0)
    channels: tuple[int, ...] = Field((32, 64, 128), min_length=1)
    dim: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


def _check_shape(config: MelCNNConfig, ctx: BuildContext) -> None:
    """Raise UserError if the spectrogram is too small for the FFT or for the CNN's pooling."""
    if config.n_fft // 2 >= ctx.audio_samples:  # centred STFT reflect-pads by n_fft/2
        raise UserError(
            f"model.encoders.audio.n_fft: {config.n_fft} is too long for {ctx.audio_samples}-sample clips "
            "(data.audio.seconds x data.audio.sample_rate)"
        )
    frames = ctx.audio_samples // config.hop_length + 1
    shrink = 2 ** len(config.channels)
    if config.n_mels < shrink or frames < shrink:
        raise UserError(
            f"model.encoders.audio.channels: {len(config.channels)} blocks halve the {config.n_mels} mels x "
            f"{frames} frames spectrogram below 1; use fewer blocks, more n_mels or a smaller hop_length"
        )


@ENCODERS.register("mel_cnn", config=MelCNNConfig, modality="audio")
class MelCNNEncoder(nn.Module):
    """Log-mel CNN audio encoder: mel spectrogram -> log -> per-sample norm -> CNN -> pool -> linear.

    Reads ``batch["audio"]`` float ``[B, N]`` mono at ``ctx.sample_rate``. Returns ``pooled [B, D]`` and the
    time frames after the CNN as ``sequence [B, T, D]`` (all real). Silent (all-zero, i.e. missing) clips give
    finite outputs.

    Raises:
        UserError: if the clip is too short for ``n_fft`` or the spectrogram too small for the CNN.
    """

    def __init__(self, config: MelCNNConfig, ctx: BuildContext):
        super().__init__()
        _check_shape(config, ctx)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=ctx.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels
        )
        # The window and filterbank follow from the config: keep them out of checkpoints and exports.
        for module in self.mel.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buf, persistent=False)
        widths = (1, *config.channels)
        self.blocks = nn.Sequential(*(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])))
        # One projection serves both outputs: mean over frames of proj(x) == proj(global-average-pool(x)).
        self.proj = nn.Linear(config.channels[-1], config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = config.dim

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` waveform -> ``[B, 1, n_mels, T]`` log-mel, normalised per sample (mean 0, var 1)."""
        # STFT in low precision loses the quiet bins the log then amplifies: always fp32.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.log(self.mel(wave.float()) + 1e-6).unsqueeze(1)
            mean = spec.mean(dim=(-2, -1), keepdim=True)
            var = spec.var(dim=(-2, -1), keepdim=True, unbiased=False)
            return (spec - mean) * torch.rsqrt(var + 1e-5)  # a silent clip has var 0 -> zeros, not NaN

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        fmap = self.blocks(self.log_mel(batch["audio"]))  # [B, C, F', T']
        tokens = self.proj(fmap.mean(dim=2).transpose(1, 2))  # [B, T', D]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(self.dropout(tokens.mean(dim=1)), self.dropout(tokens), mask)

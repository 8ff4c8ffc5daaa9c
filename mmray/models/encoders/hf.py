"""Pretrained Hugging Face encoders (``hf_text``, ``hf_image``, ``hf_audio``), loaded from local files only.

``path`` is a local model folder (``config.json`` + weights, as ``save_pretrained`` writes it) or a hub name
already in the local Hugging Face cache. Loading follows :mod:`mmray.hf_local`: nothing is downloaded unless
the user opts in; a hub name missing from the cache is a :class:`UserError` at once, never a network wait.
No model code from the folder is run (no remote code).

Every one of them takes ``lora`` (adapters instead of full fine-tuning, :mod:`mmray.models.lora`) and
``gradient_checkpointing`` (:func:`adapt`).
"""
from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from mmray import hf_local
from mmray.errors import UserError
from mmray.models.encoders import ENCODERS
from mmray.models.encoders.base import BuildContext, EncoderConfig, EncoderOutput, masked_mean
from mmray.models.encoders.text import _text_inputs
from mmray.models.lora import LoraConfig, add_lora

# Speech models are trained on 16 kHz audio; used when a folder has no preprocessor_config.json.
DEFAULT_SAMPLE_RATE = 16000


class HFEncoderConfig(EncoderConfig):
    """Keys every Hugging Face encoder shares (not registered itself)."""

    path: str = Field(description="local model folder, or a hub name already in the local Hugging Face cache")
    dim: Optional[int] = Field(None, gt=0, description="project the hidden states to dim; null = the hidden size")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the pooled and sequence outputs")
    lora: Optional[LoraConfig] = Field(
        None, description="train LoRA adapters (peft) instead of the model's weights; null = no adapters",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the model's layer activations in the backward pass instead of keeping "
        "them (less memory, about one more forward pass of time)",
    )

    @field_validator("lora")
    @classmethod
    def _trains_something(cls, v: LoraConfig | None, info: ValidationInfo) -> LoraConfig | None:
        if v is not None and info.data.get("freeze") and info.data.get("unfreeze_after_epochs") is None:
            raise ValueError("adapters of an encoder frozen for the whole run (freeze: true) would never train; "
                             "remove lora, or set freeze: false (or unfreeze_after_epochs)")
        return v

    @classmethod
    def _path_fields(cls) -> tuple[str, ...]:
        return ("path",)

    def check_files(self, key: str) -> None:
        """The model's config is there: a local folder, or a hub name in the local cache (no network)."""
        _load("AutoConfig", self.path, f"{key}.path")


class HFTextConfig(HFEncoderConfig):
    """Pretrained Hugging Face text model (BERT, MiniLM, RoBERTa...) from a local folder; uses its own tokenizer."""

    name: Literal["hf_text"] = "hf_text"
    pool: Literal["mean", "cls"] = Field("mean", description="mean over real tokens, or the first ([CLS]) token")


class HFAudioConfig(HFEncoderConfig):
    """Pretrained Hugging Face speech encoder (wav2vec2, HuBERT, WavLM, Whisper's encoder...) from a local folder."""

    name: Literal["hf_audio"] = "hf_audio"


class HFImageConfig(HFEncoderConfig):
    """Pretrained Hugging Face vision model (ViT, CLIP/SigLIP vision tower, DINOv2, ConvNeXt, Swin) from a local folder."""

    name: Literal["hf_image"] = "hf_image"
    pool: Literal["model", "mean", "cls"] = Field(
        "model", description="model = the model's own pooled output (ViT/CLIP/DINOv2: its [CLS] head, SigLIP: "
        "its attention pool, ConvNeXt/Swin: average); mean = mean over the patch sequence; cls = the first token",
    )

    def check_files(self, key: str) -> None:
        """The model's config and its image processor (``data.image`` comes from it) are there, locally."""
        super().check_files(key)
        hf_local.image_settings(self.path, f"{key}.path")


# ------------------------------------------------------------------------------------ loading
def _load(kind: str, path: str, key: str, **kwargs: Any) -> Any:
    """``Auto<kind>.from_pretrained(path)`` from local files only; every failure a UserError naming ``key``."""
    return hf_local.from_pretrained(kind, path, key, "model", **kwargs)


def load_pretrained(path: str, key: str, ctx: BuildContext, **config_updates: Any) -> nn.Module:
    """The Hugging Face base model at ``path`` (weights unless ``ctx.pretrained`` is False).

    ``config_updates`` override the model's config where it has those attributes (others are ignored).

    Raises:
        UserError: naming ``key``: the folder is missing, the hub name is not cached, or loading fails.
    """
    config = _load("AutoConfig", path, key)
    for name, value in config_updates.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if not ctx.pretrained:
        import transformers

        return transformers.AutoModel.from_config(config, trust_remote_code=False)
    return _load("AutoModel", path, key, config=config)


def adapt(model: nn.Module, config: HFEncoderConfig, key: str) -> nn.Module:
    """``model`` with the encoder's ``gradient_checkpointing`` and ``lora`` settings applied (``key``: its section).

    Checkpointing is Hugging Face's own (``activation_checkpointing_enable``, earlier ``gradient_checkpointing_enable``; non-reentrant, so it works with a
    frozen base and LoRA); it acts in training mode only.

    Raises:
        UserError: naming ``key.gradient_checkpointing`` for a model that does not support it, or
            ``key.lora.target_modules`` (:func:`mmray.models.lora.add_lora`).
    """
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"{key}.gradient_checkpointing: {type(model).__name__} ({config.path}) does not support "
                            "gradient checkpointing; set it to false")
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.lora is not None:
        model = add_lora(model, config.lora, f"{key}.lora")
    return model


def _projection(hidden: int, dim: int | None) -> nn.Module:
    return nn.Identity() if dim is None else nn.Linear(hidden, dim)


# ------------------------------------------------------------------------------------ text
@ENCODERS.register("hf_text", config=HFTextConfig, modality="text")
class HFTextEncoder(nn.Module):
    """Hugging Face ``AutoModel`` text encoder: last hidden states, masked-mean or [CLS] pooled, optional projection.

    Reads ``input_ids`` / ``attention_mask`` ``[B, L]`` tokenised by the model's own tokenizer (the schema sets
    ``data.text.tokenizer`` to ``path``). Returns ``pooled [B, D]`` (zeros for a row without tokens),
    ``sequence [B, L, D]`` = the (projected) last hidden states, ``sequence_mask = attention_mask.bool()``.
    ``D`` = ``dim``, or the model's hidden size when ``dim`` is null. The model's own pooler is dropped.

    Raises:
        UserError: the model cannot be loaded (names ``model.encoders.text.path``); ``data.text.max_length``
            exceeds the model's positions; the tokenizer has more ids than the model embeds; in ``forward`` if
            ``L > ctx.max_text_length``.
    """

    def __init__(self, config: HFTextConfig, ctx: BuildContext):
        super().__init__()
        self.model = load_pretrained(config.path, "model.encoders.text.path", ctx)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused (pooling is ours); unused parameters would break DDP
        _check_text_fits(self.model, config.path, ctx)
        self.model = adapt(self.model, config, "model.encoders.text")
        hidden = self.model.config.hidden_size
        self.proj = _projection(hidden, config.dim)
        self.pool = config.pool
        self.dropout = nn.Dropout(config.dropout)
        self.max_length = ctx.max_text_length
        self.output_dim = config.dim or hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        ids, mask = _text_inputs(batch, self.max_length)
        # A row with no real token would attend to nothing (NaN in some attention kernels): let it see
        # position 0. Its pooled output is still zeros: pooling uses the real mask.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        h = self.model(input_ids=ids, attention_mask=attend.long()).last_hidden_state  # [B, L, H]
        seq = self.proj(h)  # [B, L, D]
        pooled = masked_mean(seq, mask) if self.pool == "mean" else seq[:, 0] * mask[:, :1].to(seq.dtype)
        return EncoderOutput(self.dropout(pooled), self.dropout(seq), mask)


def _check_text_fits(model: nn.Module, path: str, ctx: BuildContext) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and ctx.max_text_length > positions:
        raise UserError(
            f"data.text.max_length: {ctx.max_text_length} exceeds the {positions} positions of {path}; "
            f"set data.text.max_length <= {positions}"
        )
    rows = model.get_input_embeddings().num_embeddings
    if ctx.vocab_size > rows:
        raise UserError(
            f"data.text.tokenizer: the tokenizer has {ctx.vocab_size} ids but {path} embeds only {rows}; "
            "hf_text needs the model's own tokenizer (leave data.text.tokenizer unset)"
        )


# ------------------------------------------------------------------------------------ image
@ENCODERS.register("hf_image", config=HFImageConfig, modality="image")
class HFImageEncoder(nn.Module):
    """Hugging Face vision model (ViT, CLIP/SigLIP vision tower, DINOv2, ConvNeXt, Swin): pooled + patch sequence.

    Reads ``batch["image"]`` float ``[B, 3, S, S]``, resized and normalised as the model's image processor
    does (the schema sets ``data.image.size/mean/std`` from it, :func:`mmray.hf_local.image_settings`). A full CLIP or SigLIP
    model (text and vision) contributes its vision tower only. Returns ``sequence [B, T, D]`` = the (projected)
    last hidden states: the tokens of a ViT-style model, the ``h x w`` feature map of ConvNeXt flattened; all
    real. ``pooled [B, D]`` per ``pool``. A ViT-style model fed another size than it was trained at
    interpolates its position embeddings.

    Raises:
        UserError: the model cannot be loaded (names ``model.encoders.image.path``) or is not a vision model.
    """

    def __init__(self, config: HFImageConfig, ctx: BuildContext):
        super().__init__()
        key = "model.encoders.image"
        model = adapt(load_pretrained(config.path, f"{key}.path", ctx), config, key)
        if getattr(model, "vision_model", None) is not None and getattr(model, "text_model", None) is not None:
            model = model.vision_model  # CLIP / SigLIP: the vision tower (checkpointing flags already set)
        params = inspect.signature(model.forward).parameters
        if "pixel_values" not in params:
            raise UserError(f"{key}.path: {config.path} is a {type(model).__name__}, which does not read images "
                            "(pixel_values); hf_image needs a vision model such as ViT, CLIP, SigLIP, DINOv2, "
                            "ConvNeXt or Swin")
        self.model = model
        self.pool = config.pool
        # Unused here; a trainable parameter without a gradient would break DDP.
        if config.pool != "model" and getattr(model, "pooler", None) is not None:
            self.model.pooler = None
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "mask_token":  # masked-image pre-training only (DINOv2, BEiT...)
                p.requires_grad_(False)
        trained_at = getattr(model.config, "image_size", None)
        self.forward_kwargs = {}
        if "interpolate_pos_encoding" in params and isinstance(trained_at, int) and trained_at != ctx.image_size:
            self.forward_kwargs["interpolate_pos_encoding"] = True
        sizes = getattr(model.config, "hidden_sizes", None)  # ConvNeXt: per stage; the last is the output's
        hidden = int(sizes[-1]) if sizes else int(model.config.hidden_size)
        self.proj = _projection(hidden, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = config.dim or hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        out = self.model(pixel_values=batch["image"], **self.forward_kwargs)
        h = out.last_hidden_state
        if h.ndim == 4:  # [B, C, h, w] feature map (ConvNeXt) -> [B, h*w, C]
            h = h.flatten(2).transpose(1, 2)
        seq = self.proj(h)  # [B, T, D]
        pooled_out = getattr(out, "pooler_output", None)
        if self.pool == "model" and pooled_out is not None:
            pooled = self.proj(pooled_out.flatten(1))
        else:
            pooled = seq[:, 0] if self.pool == "cls" else seq.mean(dim=1)
            if pooled_out is not None and pooled_out.requires_grad:
                # The model's own pooling head (CLIP's post-layernorm, SigLIP's attention pool) is not used: a
                # zero-weighted term gives its weights a (zero) gradient, which DDP needs of every trained weight.
                pooled = pooled + 0.0 * pooled_out.sum()
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
        return EncoderOutput(self.dropout(pooled), self.dropout(seq), mask)


# ------------------------------------------------------------------------------------ audio
@ENCODERS.register("hf_audio", config=HFAudioConfig, modality="audio")
class HFAudioEncoder(nn.Module):
    """Hugging Face raw-waveform speech encoder (wav2vec2, HuBERT, WavLM...): frames mean-pooled, optional projection.

    Reads ``batch["audio"]`` float ``[B, N]`` at ``data.audio.sample_rate``. A raw-waveform model gets each clip
    normalised to zero mean and unit variance when its feature extractor does (``do_normalize``); Whisper gets
    its log-mel spectrogram (:class:`WhisperLogMel`). Returns the last hidden states as ``sequence [B, T, D]``
    (all frames real: clips are fixed-length; Whisper's padding frames are dropped) and their mean as
    ``pooled [B, D]``. SpecAugment masking inside the model is switched off (it needs long clips and makes a
    frozen encoder non-deterministic).

    Raises:
        UserError: the model cannot be loaded (names ``model.encoders.audio.path``); it is neither Whisper nor
            a raw-waveform model; ``data.audio.sample_rate`` differs from the model's; the clip is too short for
            the model's convolutional front end (or longer than Whisper's window).
    """

    def __init__(self, config: HFAudioConfig, ctx: BuildContext):
        super().__init__()
        key = "model.encoders.audio.path"
        model = load_pretrained(config.path, key, ctx, apply_spec_augment=False, mask_time_prob=0.0, mask_feature_prob=0.0)
        model_type = getattr(model.config, "model_type", type(model).__name__)
        fe = _feature_extractor(config.path)
        self.log_mel: WhisperLogMel | None = None
        model = adapt(model, config, "model.encoders.audio")
        if model_type == "whisper":
            if fe is None:
                raise UserError(f"{key}: {config.path} has no preprocessor_config.json (Whisper's log-mel settings)")
            self.model = model.get_encoder()  # the decoder is not needed
            self.log_mel = WhisperLogMel(fe, self.model, ctx.audio_samples)
        elif "input_values" in inspect.signature(model.forward).parameters:
            self.model = model
        else:
            raise UserError(
                f"{key}: {config.path} is a {model_type!r} model, which does not read raw waveforms; hf_audio "
                "supports Whisper and wav2vec2-style encoders (wav2vec2, HuBERT, WavLM, data2vec-audio, UniSpeech, SEW)"
            )
        rate = int(getattr(fe, "sampling_rate", DEFAULT_SAMPLE_RATE))
        # Raw-waveform models expect each clip at zero mean and unit variance (their feature extractor's
        # do_normalize, on for nearly all of them); Whisper's log-mel has its own scaling.
        self.normalize = self.log_mel is None and bool(getattr(fe, "do_normalize", True))
        if ctx.sample_rate != rate:
            raise UserError(
                f"data.audio.sample_rate: {ctx.sample_rate} Hz, but {config.path} expects {rate} Hz audio; "
                f"set data.audio.sample_rate: {rate}"
            )
        frames = self.log_mel.frames if self.log_mel is not None else _frames(self.model, ctx.audio_samples)
        if frames is not None and frames < 1:
            raise UserError(
                f"data.audio.seconds: {ctx.audio_samples}-sample clips are too short for {config.path}'s "
                "convolutional front end; use longer clips"
            )
        hidden = self.model.config.hidden_size
        self.proj = _projection(hidden, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_dim = config.dim or hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        wave = batch["audio"].float()
        if self.log_mel is not None:
            h = self.model(input_features=self.log_mel(wave)).last_hidden_state
            h = h[:, : self.log_mel.frames]  # the frames of the clip, not of Whisper's fixed-length zero padding
        else:
            if self.normalize:  # as Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
                mean = wave.mean(dim=1, keepdim=True)
                var = wave.var(dim=1, keepdim=True, unbiased=False)
                wave = (wave - mean) * torch.rsqrt(var + 1e-7)  # a silent clip stays zeros, not NaN
            h = self.model(input_values=wave).last_hidden_state
        seq = self.proj(h)  # [B, T, D]
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
        return EncoderOutput(self.dropout(seq.mean(dim=1)), self.dropout(seq), mask)


class WhisperLogMel(nn.Module):
    """Whisper's log-mel front end in torch (as ``WhisperFeatureExtractor``), on the model's device.

    ``[B, N]`` waveform -> zero-padded to the encoder's fixed input length -> ``[B, n_mels, F]`` log-mel, clipped
    8 decades below each clip's peak and scaled as Whisper was trained. ``frames`` = encoder frames covering
    the ``N`` real samples (the rest is padding).

    Raises:
        UserError: the clip is longer than the encoder's input window (30 s for released Whisper models).
    """

    def __init__(self, fe: Any, encoder: nn.Module, samples: int):
        super().__init__()
        self.n_fft, self.hop = int(fe.n_fft), int(fe.hop_length)
        stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.window_samples = encoder.config.max_source_positions * stride * self.hop
        if samples > self.window_samples:
            raise UserError(
                f"data.audio.seconds: {samples} samples exceed the {self.window_samples}-sample window of this "
                "Whisper encoder; use shorter clips"
            )
        self.frames = -(-samples // (self.hop * stride))
        # Derived from the feature extractor: keep them out of checkpoints and exports.
        self.register_buffer("mel_filters", torch.as_tensor(fe.mel_filters, dtype=torch.float32).T, persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=wave.device.type, enabled=False):  # the log of small bins needs fp32
            wave = nn.functional.pad(wave.float(), (0, self.window_samples - wave.shape[1]))
            stft = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)
            power = (stft[..., :-1].abs() ** 2).contiguous()  # [B, n_freq, F]
            log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()  # [B, n_mels, F]
            peak = log_spec.amax(dim=(1, 2), keepdim=True)
            return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def _feature_extractor(path: str) -> Any | None:
    """The folder's feature extractor (``preprocessor_config.json``), or None without one."""
    try:
        return _load("AutoFeatureExtractor", path, "model.encoders.audio.path")
    except UserError:  # no preprocessor config: 16 kHz and per-clip normalisation, as nearly all such models
        return None


def _frames(model: nn.Module, samples: int) -> int | None:
    """Frames the model's conv front end makes from ``samples`` samples; None if the model cannot say."""
    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if lengths is None:
        return None
    try:
        return int(lengths(torch.tensor(samples)))
    except Exception:  # a model variant with another signature: the forward pass will tell
        return None

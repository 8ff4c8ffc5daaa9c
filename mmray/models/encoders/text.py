"""Text encoders over token ids from the dataset's tokenizer.

All read ``batch["input_ids"]`` int64 ``[B, L]`` and ``batch["attention_mask"]`` int64 ``[B, L]`` (1 = real
token, right-padded) and return ``pooled [B, D]`` (mean over real tokens), ``sequence [B, L, D]`` and
``sequence_mask = attention_mask.bool()``. A row with no real token (missing text) pools to zeros.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from mmray.errors import UserError
from mmray.models.encoders import ENCODERS
from mmray.models.encoders.base import BuildContext, EncoderConfig, EncoderOutput, masked_mean


class TransformerTextConfig(EncoderConfig):
    """Token embedding + learned positions + a small Transformer encoder, mean-pooled over real tokens."""

    name: Literal["transformer"] = "transformer"
    dim: int = Field(128, gt=0)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ff_dim: int = Field(256, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass instead of keeping them "
        "(less memory, about one more forward pass of time)",
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "TransformerTextConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class RecurrentTextConfig(EncoderConfig):
    """Keys shared by the recurrent text encoders (``gru``, ``lstm``)."""

    name: Literal["gru", "lstm"]
    dim: int = Field(128, gt=0)
    layers: int = Field(1, ge=1)
    bidirectional: bool = True
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class GRUTextConfig(RecurrentTextConfig):
    """Token embedding + a (bi)GRU; pooled output is the masked mean of its states."""

    name: Literal["gru"] = "gru"


class LSTMTextConfig(RecurrentTextConfig):
    """Token embedding + a (bi)LSTM; pooled output is the masked mean of its states."""

    name: Literal["lstm"] = "lstm"


class EmbeddingBagTextConfig(EncoderConfig):
    """Bag of words: mean of token embeddings (nn.EmbeddingBag) -> linear; fastest text baseline, ignores order."""

    name: Literal["embedding_bag"] = "embedding_bag"
    embed_dim: int = Field(128, gt=0, description="width of the token embedding table")
    dim: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


def _check_vocabulary(ctx: BuildContext) -> None:
    """Raise UserError when the context has no usable vocabulary."""
    if ctx.vocab_size < 1 or not 0 <= ctx.pad_token_id < ctx.vocab_size:
        raise UserError(
            f"text encoder needs a tokenizer: vocab_size={ctx.vocab_size}, pad_token_id={ctx.pad_token_id} "
            "(pass them to BuildContext.from_config)"
        )


def _token_embedding(ctx: BuildContext, dim: int) -> nn.Embedding:
    """The token table; raises UserError when the context has no usable vocabulary."""
    _check_vocabulary(ctx)
    return nn.Embedding(ctx.vocab_size, dim, padding_idx=ctx.pad_token_id)


def _text_inputs(batch: dict[str, torch.Tensor], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], mask [B, L] bool)``; raises UserError if ``L`` exceeds the built length."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if ids.shape[1] > max_length:
        raise UserError(
            f"text has {ids.shape[1]} tokens but the encoder was built for data.text.max_length={max_length}"
        )
    return ids, mask


@ENCODERS.register("transformer", config=TransformerTextConfig, modality="text")
class TransformerTextEncoder(nn.Module):
    """Small pre-norm Transformer text encoder with learned positions, mean-pooled over real tokens.

    Raises:
        UserError: at build time without a vocabulary; in ``forward`` if ``L > ctx.max_text_length``.
    """

    def __init__(self, config: TransformerTextConfig, ctx: BuildContext):
        super().__init__()
        self.embed = _token_embedding(ctx, config.dim)
        self.pos = nn.Embedding(ctx.max_text_length, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, config.ff_dim, config.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # Pre-norm layers leave the residual stream unnormalised, hence the final LayerNorm.
        self.encoder = nn.TransformerEncoder(
            layer, config.layers, norm=nn.LayerNorm(config.dim), enable_nested_tensor=False
        )
        self.max_length = ctx.max_text_length
        self.output_dim = config.dim
        self.checkpointing = config.gradient_checkpointing

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        ids, mask = _text_inputs(batch, self.max_length)
        x = self.dropout(self.embed(ids) + self.pos.weight[: ids.shape[1]])
        # A row whose keys are all masked makes softmax over nothing = NaN; let empty rows attend to
        # position 0 (a pad token). Their pooled output is still zeros: the pool uses the real mask.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            h = x  # as nn.TransformerEncoder, one layer at a time, each recomputed in the backward pass
            for layer in self.encoder.layers:
                h = checkpoint(layer, h, src_key_padding_mask=~attend, use_reentrant=False)
            h = self.encoder.norm(h)
        else:
            h = self.encoder(x, src_key_padding_mask=~attend)  # [B, L, D]
        return EncoderOutput(masked_mean(h, mask), h, mask)


@ENCODERS.register("embedding_bag", config=EmbeddingBagTextConfig, modality="text")
class EmbeddingBagTextEncoder(nn.Module):
    """Bag-of-words text encoder: ``nn.EmbeddingBag`` mean over real tokens, then a linear layer to ``dim``.

    ``pooled [B, D]`` never materialises per-token features (one fused gather-and-mean); ``sequence [B, L, D]``
    is the projected embedding of each token, for attention-style fusions.

    Raises:
        UserError: at build time without a vocabulary; in ``forward`` if ``L > ctx.max_text_length``.
    """

    def __init__(self, config: EmbeddingBagTextConfig, ctx: BuildContext):
        super().__init__()
        _check_vocabulary(ctx)
        # Padding is excluded by per-sample weights from the mask, not padding_idx: ids under the mask are arbitrary.
        self.bag = nn.EmbeddingBag(ctx.vocab_size, config.embed_dim, mode="sum")
        self.proj = nn.Linear(config.embed_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.max_length = ctx.max_text_length
        self.output_dim = config.dim

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        ids, mask = _text_inputs(batch, self.max_length)
        counts = mask.sum(dim=1, keepdim=True)
        weights = mask.to(self.bag.weight.dtype) / counts.clamp(min=1)  # sum mode + 1/count weights = masked mean
        bag = self.bag(ids, per_sample_weights=weights)  # [B, E]
        # A row without tokens pools to zeros, not to the projection's bias (that is how missing text is encoded).
        pooled = self.proj(bag) * (counts > 0).to(bag.dtype)
        seq = self.proj(nn.functional.embedding(ids, self.bag.weight))  # [B, L, D]
        return EncoderOutput(self.dropout(pooled), self.dropout(seq), mask)


@ENCODERS.register("gru", config=GRUTextConfig, modality="text")
@ENCODERS.register("lstm", config=LSTMTextConfig, modality="text")
class RecurrentTextEncoder(nn.Module):
    """GRU or LSTM text encoder over packed (right-padded) sequences, projected to ``dim`` and mean-pooled.

    The cell follows ``config.name``; its parameters sit under that name (``gru.*`` / ``lstm.*``).

    Raises:
        UserError: at build time without a vocabulary; in ``forward`` if ``L > ctx.max_text_length`` or the
            attention mask is not right-padded (packing assumes real tokens come first).
    """

    CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, config: RecurrentTextConfig, ctx: BuildContext):
        super().__init__()
        self.embed = _token_embedding(ctx, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.cell = config.name
        rnn = self.CELLS[config.name](
            config.dim, config.dim, num_layers=config.layers, batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.layers > 1 else 0.0,  # torch applies it between layers only
        )
        self.add_module(self.cell, rnn)  # keeps the "gru.*" state-dict keys of earlier checkpoints
        self.proj = nn.Linear(config.dim * (2 if config.bidirectional else 1), config.dim)
        self.max_length = ctx.max_text_length
        self.output_dim = config.dim

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        ids, mask = _text_inputs(batch, self.max_length)
        lengths = mask.sum(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        if not torch.equal(mask, positions < lengths[:, None]):
            raise UserError(f"{self.cell.upper()} text encoder needs right-padded text (attention_mask = 1s then 0s)")
        # Packing needs length >= 1; an empty row runs over one pad token and is masked out of the pool.
        # pack_padded_sequence wants lengths on the CPU: one small host sync per batch.
        packed = pack_padded_sequence(
            self.dropout(self.embed(ids)), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        output = getattr(self, self.cell)(packed)[0]
        states, _ = pad_packed_sequence(output, batch_first=True, total_length=ids.shape[1])
        seq = self.proj(states)  # [B, L, D]
        return EncoderOutput(self.dropout(masked_mean(seq, mask)), seq, mask)


GRUTextEncoder = RecurrentTextEncoder  # the name earlier code imported

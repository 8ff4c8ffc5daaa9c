"""LoRA adapters on pretrained Hugging Face encoders, with the ``peft`` library.

Why ``peft``: it is what the field uses for adapters; its LoRA layers cover ``nn.Linear``, ``nn.Conv*`` and
``nn.Embedding`` (and the transformers-specific ``Conv1D``), with tested merge maths. mmray injects the
adapters into the encoder's own model (``peft.inject_adapter_in_model``), so the model keeps its class and
``config``; the base weights no longer train (``requires_grad=False``), the adapters (and the encoder's
projection, the fusion and the heads) do.

Where the weights go:

- checkpoints leave the frozen base weights out and record their sha256 (:func:`base_hash`), as slim
  checkpoints do for frozen encoders (:mod:`mmray.train.checkpoint`);
- exports hold *merged* weights (:func:`merged_state_dict`: each adapted layer's weight plus its LoRA delta,
  under the plain layer's names), so :func:`mmray.load_model` builds the model without adapters and needs no
  ``peft``.

Plain PyTorch; ``peft`` is imported only where adapters are built or merged.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from mmray.errors import UserError
from mmray.models.hashing import tensors_hash
from mmray.registry import StrictModel

ADAPTER = "default"  # peft's adapter name; one adapter per encoder

# Tried in order when ``target_modules`` is null: the first pair of layer names the model has wins.
# Attention query/value projections (LoRA paper; peft's defaults for BERT, ViT, CLIP, wav2vec2, Whisper...),
# then ConvNeXt's pointwise convolutions (it has no attention).
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),      # BERT, RoBERTa
    ("q_proj", "v_proj"),    # ViT, DINOv2, Swin, CLIP, SigLIP, wav2vec2, HuBERT, WavLM, Whisper
    ("q_lin", "v_lin"),      # DistilBERT
    ("q", "v"),              # T5-style
    ("pwconv1", "pwconv2"),  # ConvNeXt
)


class LoraConfig(StrictModel):
    """LoRA adapters on a Hugging Face encoder: only they train, the pretrained weights stay as loaded."""

    rank: int = Field(8, ge=1, description="rank r of each adapter (B @ A, A: r x in, B: out x r)")
    alpha: float = Field(16.0, gt=0, description="the adapter's update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: Optional[tuple[str, ...]] = Field(
        None, min_length=1, description="names (last component) of the layers to adapt; null = the model's "
        "attention query and value projections (query/value, q_proj/v_proj, q_lin/v_lin, q/v), or ConvNeXt's "
        "pointwise convolutions (pwconv1/pwconv2)",
    )


def default_targets(model: nn.Module) -> tuple[str, ...] | None:
    """The first :data:`DEFAULT_TARGETS` pair whose names all occur as layer names in ``model``; None if none."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return next((pair for pair in DEFAULT_TARGETS if set(pair) <= names), None)


def add_lora(model: nn.Module, settings: LoraConfig, key: str) -> nn.Module:
    """``model`` with LoRA adapters injected in place; its other parameters stop training.

    Raises:
        UserError: naming ``key.target_modules``: no layer of that name (or none of the defaults) in the model.
    """
    import peft

    targets = settings.target_modules or default_targets(model)
    if targets is None:
        raise UserError(f"{key}.target_modules: none of the default layer names "
                        f"({', '.join('/'.join(p) for p in DEFAULT_TARGETS)}) occur in this "
                        f"{type(model).__name__}; name the layers to adapt")
    lora = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           target_modules=list(targets), bias="none")
    try:
        model = peft.inject_adapter_in_model(lora, model, adapter_name=ADAPTER)
    except (ValueError, TypeError) as e:  # no such layer, or a layer type LoRA does not support
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{key}.target_modules: {list(targets)}: {first}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted name -> peft LoRA layer (a module holding ``base_layer`` and ``lora_A``) inside ``model``."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}


def has_lora(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA layer merged: ``<layer>.weight`` = base + the adapter's delta,
    ``<layer>.bias`` = the base's, and no adapter keys; i.e. the keys of the same model built without LoRA.

    ``model`` itself is left as it is (nothing merged in place).
    """
    state = model.state_dict()
    layers = _lora_layers(model)
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    owners = sorted(layers, key=len, reverse=True)
    for key, t in state.items():
        owner = next((n for n in owners if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = t
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_A / lora_B / ...: folded into the weight below
        name = rest[len("base_layer."):]
        if name == "weight":
            layer = layers[owner]
            with torch.no_grad():
                delta = layer.get_delta_weight(ADAPTER) if ADAPTER in layer.lora_A else 0
                t = (t + delta).to(t.dtype)
        out[f"{owner}.{name}"] = t
    return out


def base_parameter_names(module: nn.Module) -> list[str]:
    """The state-dict names of ``module``'s parameters that do not train (a LoRA model's base weights)."""
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad)


def base_hash(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of :func:`base_parameter_names` (in name order)."""

    params = dict(module.named_parameters(remove_duplicate=False))
    return tensors_hash({name: params[name] for name in base_parameter_names(module)})

"""How a compressed export's tensors are stored and loaded back: int8 per-channel or fp16 / bf16 (no Ray, no pickle).

The format (``quantization.json`` and the tensors in ``model.safetensors``) is described in
:mod:`mmray.export.quantize`, which writes compressed folders; :func:`mmray.export.loader.load_model`
reads them through :func:`load_compressed_state`.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mmray.errors import UserError
from mmray.export.writer import weights_for_safetensors

log = logging.getLogger("mmray.export")

MODES = ("int8", "fp16", "bf16")
QUANTIZATION_FILE = "quantization.json"
SCALE_SUFFIX = "_scale"  # int8 tensor KEY is stored with its per-row float32 scales at KEY + "_scale"
# Other weight tensors (convolution kernels, embedding tables, attention projections) this large or
# larger are stored as int8 too and widened to float32 at load: smaller files, float compute.
MIN_WEIGHT_ONLY_ELEMENTS = 1024
# Linear layers run torch's int8 kernel from this many weights (512 x 512) up. Below it the kernel's
# per-call cost (quantising the activations) made it slower than float32 at batch 1 on CPU
# (benchmarks/RESULTS.md); such layers are stored in int8 and widened at load like the rest.
MIN_INT8_KERNEL_ELEMENTS = 512 * 512
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------ reading
def read_quantization(export_dir: str | Path) -> dict[str, Any] | None:
    """The ``quantization.json`` of a compressed export, or ``None`` for a full-precision one.

    Raises:
        UserError: the file exists but is not valid JSON or names no known mode.
    """
    path = Path(export_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(spec, dict) or spec.get("mode") not in MODES:
        raise UserError(f"{path}: 'mode' must be one of {', '.join(MODES)}")
    return spec


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`; raises :class:`UserError` listing them otherwise."""
    if mode not in MODES:
        raise UserError(f"--quantize: {mode!r} is not a quantisation mode; choose one of {', '.join(MODES)}")
    return mode


# ------------------------------------------------------------------ compressing
def quantizable_linears(model: nn.Module, min_elements: int = 0) -> list[str]:
    """Names of the plain ``nn.Linear`` modules with at least ``min_elements`` weights (subclasses such
    as attention's ``out_proj`` are called through their weight tensor, not their forward)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and m.weight.numel() >= min_elements]


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per slice along dim 0: ``weight [out, ...] ~= q.float() * scale[:, None, ...]``.

    Returns:
        ``(q int8 [out, ...], scale float32 [out])``; an all-zero slice gets scale 1 (exact zeros).
    """
    w = weight.detach().float().cpu()
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / _per_row(scale, w)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of :func:`quantize_weight_int8`'s output."""
    return q.float() * _per_row(scale.float(), q)


def _per_row(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


def compress_state(model: nn.Module, mode: str, min_kernel_elements: int = MIN_INT8_KERNEL_ELEMENTS,
                   ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The tensors to store for ``model`` in ``mode``, the linear layers that run in int8, and the
    other state keys stored as int8 but computed in float32 (both lists empty for fp16 / bf16).

    Tensors are standalone contiguous CPU copies (safetensors refuses shared storage).
    """
    state = weights_for_safetensors(model)
    if mode in HALF_DTYPES:
        dtype = HALF_DTYPES[mode]
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, [], []
    linears = quantizable_linears(model, min_kernel_elements)
    linear_weights = {f"{name}.weight" for name in linears}
    weight_only = [k for k, v in state.items() if k not in linear_weights and v.is_floating_point()
                   and v.dim() >= 2 and v.numel() >= MIN_WEIGHT_ONLY_ELEMENTS]
    for key in sorted(linear_weights) + weight_only:
        state[key], state[f"{key}{SCALE_SUFFIX}"] = quantize_weight_int8(state[key])
    return state, linears, weight_only


# ------------------------------------------------------------------ loading
def load_compressed_state(model: nn.Module, state: dict[str, torch.Tensor], spec: Mapping[str, Any]) -> nn.Module:
    """Load the tensors of a compressed export into the freshly built float ``model``, in place.

    ``int8``: the listed linear layers are replaced by dynamically quantised ones (CPU only).
    ``fp16`` / ``bf16``: tensors are widened to float32.

    Raises:
        RuntimeError: the tensors do not match the model (the loader turns it into a UserError).
    """
    if spec["mode"] in HALF_DTYPES:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        return model
    state = dict(state)
    for key in spec.get("int8_weights", []):
        if f"{key}{SCALE_SUFFIX}" not in state or key not in state:
            raise RuntimeError(f"{key!r} has no int8 tensor and scale in the file")
        state[key] = dequantize_int8(state[key], state.pop(f"{key}{SCALE_SUFFIX}"))
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for name in spec["linear_layers"]:
        try:
            q, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight{SCALE_SUFFIX}")
        except KeyError:
            raise RuntimeError(f"linear layer {name!r} has no int8 weight and scale in the file") from None
        quantized[name] = (q, scale, state.pop(f"{name}.bias", None))
    skipped = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    engine = _quantized_engine()
    if engine is None:
        log.warning("this torch build has no quantised CPU engine; int8 weights are dequantised to float32")
    for name, (q, scale, bias) in quantized.items():
        _replace_linear(model, name, q, scale, bias, engine is not None)
    _disable_transformer_fast_path(model, set(quantized))
    return model


def _quantized_engine() -> str | None:
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        return None
    if torch.backends.quantized.engine in (None, "none"):
        torch.backends.quantized.engine = engines[0]
    return torch.backends.quantized.engine


def _replace_linear(model: nn.Module, name: str, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, quantized_kernels: bool) -> None:
    old = model.get_submodule(name)
    if tuple(q.shape) != (old.out_features, old.in_features) or q.dtype != torch.int8 or scale.shape != (q.shape[0],):
        raise RuntimeError(f"{name}: int8 weight {tuple(q.shape)} {q.dtype} / scale {tuple(scale.shape)} do not fit "
                           f"a Linear({old.in_features}, {old.out_features})")
    bias = None if bias is None else bias.float()
    if quantized_kernels:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        with warnings.catch_warnings():  # torch 2.x marks its quantised tensor type as deprecated
            warnings.simplefilter("ignore")
            weight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0
            )
            new = DynamicQuantizedLinear(old.in_features, old.out_features, bias_=bias is not None, dtype=torch.qint8)
            new.set_weight_bias(weight, bias)
    else:
        new = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
        with torch.no_grad():
            new.weight.copy_(dequantize_int8(q, scale))
            if bias is not None:
                new.bias.copy_(bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _disable_transformer_fast_path(model: nn.Module, quantized: set[str]) -> None:
    """``nn.TransformerEncoderLayer``'s fused inference kernel reads ``linear1.weight`` as a float tensor;
    a layer whose feed-forward is int8 must take the ordinary path, which calls the modules."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            prefix = f"{name}." if name else ""
            if {f"{prefix}linear1", f"{prefix}linear2"} & quantized:
                m.activation_relu_or_gelu = 0  # one of the fast path's preconditions; checked per call

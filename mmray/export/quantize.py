"""Compressed copies of a model export: int8 linear layers, or fp16 / bf16 weights (no Ray, no pickle).

``mmray export MODEL_DIR --quantize MODE`` calls :func:`quantize_export`; :func:`mmray.load_model`
reads the result like any export; ``mmray evaluate`` on it adds :func:`compare_with_source`.

How each mode is stored and run (the folder stays safetensors + config, never a pickled module):

- ``int8``: every ``nn.Linear`` of at least :data:`MIN_INT8_KERNEL_ELEMENTS` weights is dynamically
  quantised. Its weight is stored as ``NAME.weight`` (``int8 [out, in]``, symmetric per output
  channel) with ``NAME.weight_scale`` (``float32 [out]``); at load the layer becomes
  ``torch.ao.nn.quantized.dynamic.Linear`` (int8 weights, activations quantised per batch at run
  time, int8 matmul on CPU). The other weight tensors of at least :data:`MIN_WEIGHT_ONLY_ELEMENTS`
  elements (smaller linear layers, convolution kernels, embedding tables, attention projections) are
  stored the same way but widened to float32 at load ("weight-only": smaller files, float compute).
  Biases and norm parameters stay float32. Where the build of torch has no quantised engine the
  linear layers are widened too (same files, float compute).
- ``fp16`` / ``bf16``: every floating tensor is stored in half precision and widened to float32 at
  load. On CPU, half-precision compute is slower than float32 for these models (see
  ``benchmarks/RESULTS.md``), so these modes save disk and download size, not latency.

The folder records its mode in ``quantization.json`` (and in the safetensors metadata):
``{"mode", "source", "source_weights_bytes", "source_metrics", "linear_layers" (int8 kernels),
"int8_weights" (weight-only), "versions"}``. Every other file of the source export (config, labels,
tokenizer, metrics, versions, anything else it carries) is copied.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from mmray.config import UserError
from mmray.export.writer import CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE, collect_versions, replace_dir

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
# Outputs of `mmray evaluate` describe the source model, not the copy: never carried over.
_NOT_COPIED = (WEIGHTS_FILE, QUANTIZATION_FILE, "eval-*.json", "confusion-*.png", "compare-*.json")


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


def check_export_dir(path: str | Path) -> Path:
    """``path`` as a Path if it holds a model export's weights, config and labels; else :class:`UserError`."""
    root = Path(path)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE) if not (root / n).is_file()]
    if not root.is_dir() or missing:
        what = "does not exist" if not root.exists() else f"has no {', '.join(missing) or 'files'}"
        raise UserError(f"{root}: not a model export folder ({what}); pass the export/ folder of a run")
    return root


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
    from mmray.export.writer import weights_for_safetensors

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


def default_out(model_dir: str | Path, mode: str) -> Path:
    """The sibling folder a compressed copy goes to by default: ``runs/x/export`` -> ``runs/x/export-int8``."""
    root = Path(model_dir).resolve()
    return root.parent / f"{root.name}-{mode}"


def folder_bytes(path: str | Path) -> int:
    """Bytes of the export's own files under ``path`` (not what ``mmray evaluate`` added next to them)."""
    root = Path(path)
    added = [p for p in _NOT_COPIED if "*" in p]
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and not (f.parent == root and any(f.match(p) for p in added)))


def quantize_export(model_dir: str | Path, mode: str, out: str | Path | None = None,
                    min_kernel_elements: int = MIN_INT8_KERNEL_ELEMENTS) -> dict[str, Any]:
    """Write a compressed copy of the export at ``model_dir``.

    Args:
        model_dir: a full-precision model export folder.
        mode: ``int8``, ``fp16`` or ``bf16`` (see the module docstring).
        out: the new folder; default the sibling ``<model_dir>-<mode>``. An earlier export there is replaced.
        min_kernel_elements: ``int8`` only: linear layers with fewer weights are stored int8 but run in
            float32 (0 = every linear layer runs the int8 kernel).

    Returns:
        ``{"out", "mode", "linear_layers", "int8_weights", "source_weights_bytes", "weights_bytes"}``
        (the two counts: layers on int8 kernels, other tensors stored in int8).

    Raises:
        UserError: an unknown mode, ``model_dir`` is not an export or is already compressed, or
            ``out`` is ``model_dir`` or holds something that is not an export.
    """
    from mmray.export.loader import load_model

    check_mode(mode)
    src = check_export_dir(model_dir)
    if read_quantization(src) is not None:
        raise UserError(f"{src}: already a compressed export ({QUANTIZATION_FILE}); compress the original instead")
    dest = Path(out) if out is not None else default_out(src, mode)
    if dest.resolve() == src.resolve():
        raise UserError(f"--out {dest}: is the source export itself; choose another folder")

    predictor = load_model(src)
    state, linears, weight_only = compress_state(predictor.model, mode, min_kernel_elements)
    source_metrics = _read_json(src / "metrics.json")
    spec = {
        "mode": mode,
        "source": str(src.resolve()),
        "source_weights_bytes": (src / WEIGHTS_FILE).stat().st_size,
        "source_metrics": source_metrics,
        "linear_layers": linears,
        "int8_weights": weight_only,
        "versions": collect_versions(),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        _copy_export_files(src, tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mmray.quantize": mode})
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(dest),
        "mode": mode,
        "linear_layers": len(linears),
        "int8_weights": len(weight_only),
        "source_weights_bytes": spec["source_weights_bytes"],
        "weights_bytes": (dest / WEIGHTS_FILE).stat().st_size,
    }


def _copy_export_files(src: Path, dest: Path) -> None:
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or any(item.match(p) for p in _NOT_COPIED):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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


# ------------------------------------------------------------------ measuring
def latency_ms(predictor: Any, batch: Mapping[str, Any], min_seconds: float = 0.5, min_repeats: int = 5,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds per sample of ``predictor.predict_batch(batch)`` (after one warm-up call).

    ``clock`` is wall-clock time by default; ``time.thread_time`` measures this thread's CPU time,
    which on a busy machine (with one torch thread) is the latency the call would have on an idle core.
    """
    rows = len(batch["label"])
    predictor.predict_batch(batch)
    n, start = 0, clock()
    while n < min_repeats or clock() - start < min_seconds:
        predictor.predict_batch(batch)
        n += 1
    return (clock() - start) / n / rows * 1000.0


def _rows(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


def compare_with_source(model_dir: str | Path, data_dir: str | Path, split: str = "test",
                        batch_size: int = 256, latency_batch: int = 32, write: bool = True) -> dict[str, Any]:
    """Accuracy, size on disk and CPU latency of a compressed export next to its source export's.

    Both models predict the same decoded rows. When the source export is no longer where
    ``quantization.json`` says, its accuracy is read from the metrics recorded at compression
    time (``source_metrics``, the training run's ``metrics.json``), and its latency is not measured.

    Returns:
        ``{"split", "mode", "rows", "agreement", "latency_batch", "compressed": {...}, "original": {...}}``,
        each side with ``accuracy``, ``f1``, ``weights_bytes``, ``folder_bytes``, ``ms_per_sample_batch1``,
        ``ms_per_sample_batched`` and ``measured`` (False = read from metrics.json). ``agreement`` is the
        share of rows where both predict the same class (``None`` without the source). Written to
        ``compare-<split>.json`` in ``model_dir`` when ``write``.

    Raises:
        UserError: ``model_dir`` is not a compressed export, or the dataset does not fit it.
    """
    from mmray.export.evaluate import split_batches
    from mmray.export.loader import load_model
    from mmray.train.metrics import ClassificationMetrics

    root = check_export_dir(model_dir)
    spec = read_quantization(root)
    if spec is None:
        raise UserError(f"{root}: not a compressed export (no {QUANTIZATION_FILE}); see `mmray export --help`")
    compressed = load_model(root)
    source_dir = Path(spec["source"])
    source = None
    try:
        if read_quantization(check_export_dir(source_dir)) is None:
            source = load_model(source_dir)
    except UserError as e:
        log.warning("source export not loadable (%s); using its recorded metrics", e)

    n_classes = len(compressed.class_names)
    metrics = {"compressed": ClassificationMetrics(n_classes), "original": ClassificationMetrics(n_classes)}
    agree, sample = 0, None
    for batch in split_batches(compressed, data_dir, split, batch_size):
        valid = batch["valid"].bool()
        if not valid.any():
            continue
        if sample is None:  # latency does not depend on which rows: the first ones of the split
            sample = _rows(batch, latency_batch)
        probs = compressed.predict_batch(batch)[valid]
        labels = batch["label"][valid]
        metrics["compressed"].update(probs, labels)
        if source is not None:
            src_probs = source.predict_batch(batch)[valid]
            metrics["original"].update(src_probs, labels)
            agree += int((probs.argmax(1) == src_probs.argmax(1)).sum())

    result: dict[str, Any] = {"split": split, "mode": spec["mode"], "model_dir": str(root),
                              "source": str(source_dir), "latency_batch": None, "agreement": None}
    sides = {"compressed": (compressed, root), "original": (source, source_dir)}
    for side, (predictor, folder) in sides.items():
        entry: dict[str, Any] = {"measured": predictor is not None}
        if predictor is not None:
            m = metrics[side].compute()
            entry |= {"rows": m["rows"], "accuracy": m["accuracy"], "f1": m["f1"]}
            entry |= {"weights_bytes": (folder / WEIGHTS_FILE).stat().st_size, "folder_bytes": folder_bytes(folder)}
        else:
            recorded = spec.get("source_metrics") or {}
            entry |= {"accuracy": recorded.get(f"{split}.accuracy"), "f1": recorded.get(f"{split}.f1"),
                      "weights_bytes": spec.get("source_weights_bytes")}
        result[side] = entry
    if sample is not None:
        _measure_latency({side: p for side, (p, _) in sides.items() if p is not None}, sample, result)
    result["rows"] = result["compressed"].get("rows", 0)
    if sample is not None:
        result["latency_batch"] = len(sample["label"])
    if source is not None and result["rows"]:
        result["agreement"] = agree / result["rows"]
    if write:
        (root / f"compare-{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure_latency(predictors: Mapping[str, Any], sample: Mapping[str, Any], result: dict[str, Any],
                     rounds: int = 3) -> None:
    """Median ms/sample at batch 1 and batched; the models alternate within each round, so background
    load hits both alike."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for side, predictor in predictors.items():
            for key, batch in (("ms_per_sample_batch1", _rows(sample, 1)), ("ms_per_sample_batched", sample)):
                times.setdefault((side, key), []).append(latency_ms(predictor, batch, min_seconds=0.2))
    for (side, key), values in times.items():
        result[side][key] = statistics.median(values)


def format_comparison(result: Mapping[str, Any]) -> str:
    """A terminal table of :func:`compare_with_source`'s result."""
    comp, orig = result["compressed"], result["original"]
    b = result.get("latency_batch") or 0

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def mb(v: Any) -> str:
        return "-" if v is None else f"{v / 1e6:.3f} MB"

    rows = [
        ("accuracy", num(orig.get("accuracy"), ".4f"), num(comp.get("accuracy"), ".4f")),
        ("f1", num(orig.get("f1"), ".4f"), num(comp.get("f1"), ".4f")),
        ("weights on disk", mb(orig.get("weights_bytes")), mb(comp.get("weights_bytes"))),
        ("export folder", mb(orig.get("folder_bytes")), mb(comp.get("folder_bytes"))),
        ("ms/sample, batch 1", num(orig.get("ms_per_sample_batch1"), ".3f"),
         num(comp.get("ms_per_sample_batch1"), ".3f")),
        (f"ms/sample, batch {b}", num(orig.get("ms_per_sample_batched"), ".3f"),
         num(comp.get("ms_per_sample_batched"), ".3f")),
    ]
    lines = ["", f"compressed ({result['mode']}) vs original on split {result['split']} "
                 f"({result['rows']} rows; CPU, {torch.get_num_threads()} threads)",
             f"{'':<22} {'original':>12} {result['mode']:>12}"]
    lines += [f"{k:<22} {o:>12} {c:>12}" for k, o, c in rows]
    if result.get("agreement") is not None:
        lines.append(f"same prediction as the original on {result['agreement']:.1%} of rows")
    lines.append("latency: wall-clock median of 3 alternating rounds; it varies with other load on the machine")
    if not orig.get("measured"):
        lines.append(f"original not found at {result['source']}: its accuracy is the one recorded in its metrics.json")
    return "\n".join(lines)

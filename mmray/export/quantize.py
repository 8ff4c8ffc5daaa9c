"""Compressed copies of a model export: int8 linear layers, or fp16 / bf16 weights (no Ray, no pickle).

``mmray export MODEL_DIR --quantize MODE`` calls :func:`quantize_export`; :func:`mmray.load_model`
reads the result like any export (the tensors' codec is :mod:`mmray.export.codec`); ``mmray evaluate`` on it
adds :func:`mmray.export.compare.compare_with_source`.

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
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmray import storage as store
from mmray.errors import UserError
from mmray.export.codec import (
    MIN_INT8_KERNEL_ELEMENTS,
    QUANTIZATION_FILE,
    check_mode,
    compress_state,
    read_quantization,
)
from mmray.export.loader import load_model
from mmray.export.writer import (
    CONFIG_FILE,
    EXPORT_METRICS_FILE,
    LABELS_FILE,
    MEMBERS_DIR,
    WEIGHTS_FILE,
    collect_versions,
    is_ensemble,
    read_members,
    replace_dir,
)

# Outputs of `mmray evaluate` describe the source model, not the copy: never carried over.
_NOT_COPIED = (WEIGHTS_FILE, QUANTIZATION_FILE, "eval-*.json", "confusion-*.png", "compare-*.json")


def check_export_dir(path: str | Path) -> Path:
    """``path`` as a Path if it holds a model export's weights, config and labels; else :class:`UserError`."""
    root = Path(path)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE) if not (root / n).is_file()]
    if not root.is_dir() or missing:
        what = "does not exist" if not root.exists() else f"has no {', '.join(missing) or 'files'}"
        raise UserError(f"{root}: not a model export folder ({what}); pass the export/ folder of a run")
    return root


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
    check_mode(mode)

    if is_ensemble(model_dir):
        return _quantize_ensemble(Path(model_dir), mode, out, min_kernel_elements)
    src = check_export_dir(model_dir)
    if read_quantization(src) is not None:
        raise UserError(f"{src}: already a compressed export ({QUANTIZATION_FILE}); compress the original instead")
    dest = Path(out) if out is not None else default_out(src, mode)
    if dest.resolve() == src.resolve():
        raise UserError(f"--out {dest}: is the source export itself; choose another folder")

    predictor = load_model(src)
    state, linears, weight_only = compress_state(predictor.model, mode, min_kernel_elements)
    source_metrics = _read_json(src / EXPORT_METRICS_FILE)
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
        store.save_weights(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mmray.quantize": mode})
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


def _quantize_ensemble(src: Path, mode: str, out: str | Path | None, min_kernel_elements: int) -> dict[str, Any]:
    """An ensemble export compressed member by member (``members/<i>/`` each a compressed export)."""

    dest = Path(out) if out is not None else default_out(src, mode)
    if dest.resolve() == src.resolve():
        raise UserError(f"--out {dest}: is the source export itself; choose another folder")
    members = read_members(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)
    totals = {"linear_layers": 0, "int8_weights": 0, "source_weights_bytes": 0, "weights_bytes": 0}
    try:
        for item in src.iterdir():
            if item.name == MEMBERS_DIR or any(item.match(p) for p in _NOT_COPIED):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for member in members:
            done = quantize_export(member, mode, out=tmp / member.relative_to(src), min_kernel_elements=min_kernel_elements)
            for k in totals:
                totals[k] += done[k]
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(dest), "mode": mode, **totals}


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

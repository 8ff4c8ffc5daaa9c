"""Write a model export folder (no Ray, no pickle).

Layout (the product contract)::

    OUT/model.safetensors   weights only (state dict), loads with safetensors, never unpickled
    OUT/config.yaml         the resolved job config (every default written out)
    OUT/labels.json         {"label": [class names], "label_<task>": [...]}  index = label id
    OUT/tokenizer/          the text tokenizer's files (only when text is a modality)
    OUT/encoders/<modality>/  for Hugging Face encoders (hf_text, hf_image, hf_audio): the model's config.json
                            (and preprocessor_config.json), so the architecture is rebuilt from the export alone

LoRA adapters are merged into the weights they adapt (:func:`mmray.models.lora.merged_state_dict`): an export
is read as the same model without adapters, and loading it needs no ``peft``.
    OUT/metrics.json        {"epoch": N, ...the metrics passed in (validation / test)}
    OUT/versions.json       {"mmray", "torch", "ray", "python", "git_commit"}
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from mmray import storage as store
from mmray.config import JobConfig, UserError, to_yaml
from mmray.models.encoders.hf import _feature_extractor, _load
from mmray.models.lora import merged_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_METRICS_FILE = "metrics.json"  # not the run folder's per-epoch metrics.jsonl
VERSIONS_FILE = "versions.json"
ENCODERS_DIR = "encoders"
HF_ENCODERS = ("hf_text", "hf_image", "hf_audio")


def export_files(modalities: tuple[str, ...], config: JobConfig | None = None) -> list[str]:
    """The names an export holds at its top level for a model over ``modalities`` (sorted); with ``config``,
    ``encoders`` too when it has a Hugging Face encoder."""
    names = [WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE, EXPORT_METRICS_FILE, VERSIONS_FILE]
    if "text" in modalities:
        names.append(TOKENIZER_DIR)
    if config is not None and hf_encoders(config):
        names.append(ENCODERS_DIR)
    return sorted(names)


def hf_encoders(config: JobConfig) -> dict[str, Any]:
    """modality -> encoder config, for the job's Hugging Face encoders (their architecture lives in files)."""
    return {m: enc for m in config.data.modalities
            if (enc := getattr(config.model.encoders, m)).name in HF_ENCODERS}


def save_hf_architecture(config: JobConfig, out: Path) -> None:
    """Save each Hugging Face encoder's ``config.json`` (and feature extractor config, if it has one) under
    ``out/encoders/<modality>/``: with them an export rebuilds the architecture without the original folder
    (the weights come from ``model.safetensors``; a text model's tokenizer is in ``tokenizer/``)."""
    for modality, enc in hf_encoders(config).items():
        dest = out / ENCODERS_DIR / modality
        dest.mkdir(parents=True)
        key = f"model.encoders.{modality}.path"
        _load("AutoConfig", enc.path, key).save_pretrained(str(dest))
        fe = _feature_extractor(enc.path) if enc.name == "hf_audio" else None
        if enc.name == "hf_image":  # the data.image settings are in config.yaml; the processor documents them
            fe = _load("AutoImageProcessor", enc.path, key)
        if fe is not None:
            fe.save_pretrained(str(dest))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers (their keys carry prefixes)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def weights_for_safetensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as standalone contiguous CPU tensors, LoRA adapters merged into their layers.

    safetensors refuses tensors that share storage (tied weights) or are views into a larger
    buffer; cloning those keeps every state-dict key, so ``load_state_dict(strict=True)`` works
    and tied parameters are simply restored twice with the same values.
    """

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in merged_state_dict(model).items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        seen.add(storage.data_ptr())
        t = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
        out[name] = t
    return out


def read_metrics(export_dir: str | Path) -> dict[str, Any]:
    """The export's ``metrics.json`` (``epoch``, ``val.*``, ``test.*``); ``export_dir`` is a local path or a URI.

    Raises:
        OSError: no such file. ValueError: not valid JSON.
    """
    return json.loads(store.read_text(store.join(str(export_dir), EXPORT_METRICS_FILE)))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the mmray source tree, if it is a git checkout (an installed wheel is not)."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def collect_versions() -> dict[str, Any]:
    """Versions saved with every export. Ray's comes from package metadata: importing it is slow and not needed."""
    return {
        "mmray": _package_version("mmray"),
        "torch": torch.__version__,
        "ray": _package_version("ray"),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }


def _labels(info: Any, model: torch.nn.Module) -> dict[str, list[str]]:
    """Class names per task the model predicts, ``label`` first."""
    tasks: dict[str, list[str]] = {"label": list(info.class_names)}
    for task, names in (getattr(info, "tasks", None) or {}).items():
        tasks[task] = list(names)
    model_tasks = getattr(model, "tasks", None)
    if model_tasks is not None:  # only the heads the model actually has, so a strict reload matches
        tasks = {t: names for t, names in tasks.items() if t in model_tasks}
    return tasks


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing an earlier export there."""
    if out.exists():
        # an export: one model's weights, or an ensemble's description (mmray.export.ensemble)
        if not (out / WEIGHTS_FILE).is_file() and not (out / "ensemble.json").is_file() and any(out.iterdir()):
            raise UserError(f"{out}: exists, is not empty and is not a model export; choose another folder")
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_export(
    out_dir: str | Path,
    model: torch.nn.Module,
    config: JobConfig,
    info: Any,
    tokenizer: Any,
    metrics: Mapping[str, Any],
    epoch: int | None = None,
) -> Path | str:
    """Write ``model`` as an export folder that :func:`mmray.export.load_model` reads back with no Ray.

    The folder is assembled next to ``out_dir`` and moved into place at the end, so a reader never
    sees half an export; an earlier export at ``out_dir`` is replaced.

    Args:
        out_dir: the export folder: a local path, or a URI (``s3://...``) that it is uploaded to.
        model: the trained ``MultimodalModel`` (a DDP or compiled wrapper is unwrapped); any device.
        config: the resolved job config the model was built from.
        info: the training dataset's ``DatasetInfo`` (class names and task names).
        tokenizer: the ``TextTokenizer`` used in training; required when ``text`` is a modality.
        metrics: JSON-serialisable metrics, e.g. ``{"val": {...}, "test": {...}}``.
        epoch: the epoch the weights come from (``None`` when unknown).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path` (a URI is returned as given).

    Raises:
        UserError: ``out_dir`` holds something that is not an export, or a text model has no tokenizer.
    """
    if store.is_uri(str(out_dir)):
        return _write_remote(str(out_dir), model, config, info, tokenizer, metrics, epoch)
    out = Path(out_dir)
    model = unwrap_model(model)
    if "text" in config.data.modalities and tokenizer is None:
        raise UserError("write_export: the model reads text but no tokenizer was given")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    try:
        store.save_weights(weights_for_safetensors(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(to_yaml(config))
        _write_json(tmp / LABELS_FILE, _labels(info, model))
        if "text" in config.data.modalities:
            (tmp / TOKENIZER_DIR).mkdir()
            tokenizer.save(str(tmp / TOKENIZER_DIR))
        save_hf_architecture(config, tmp)
        _write_json(tmp / EXPORT_METRICS_FILE, {**dict(metrics), "epoch": epoch})
        _write_json(tmp / VERSIONS_FILE, collect_versions())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_remote(uri: str, model, config, info, tokenizer, metrics, epoch) -> str:
    """Assemble the export locally, then replace whatever export was at ``uri`` with it."""
    existing = store.listdir(uri)
    if existing and WEIGHTS_FILE not in existing:
        raise UserError(f"{uri}: exists, is not empty and is not a model export; choose another folder")
    with tempfile.TemporaryDirectory(prefix="mmray-export-") as tmp:
        local = write_export(os.path.join(tmp, "export"), model, config, info, tokenizer, metrics, epoch)
        store.remove(uri)
        store.upload(str(local), uri)
    return uri


# ------------------------------------------------------------------ ensemble exports (mmray.export.ensemble)
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
COMBINE = "mean_probabilities"


def is_ensemble(export_dir: str | Path) -> bool:
    return (Path(export_dir) / ENSEMBLE_FILE).is_file()


def read_members(export_dir: str | Path) -> list[Path]:
    """The member folders an ensemble export lists, in order. Raises :class:`UserError` if unreadable."""
    root = Path(export_dir)
    path = root / ENSEMBLE_FILE
    try:
        spec = json.loads(path.read_text())
        members = [root / m for m in spec["members"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable ensemble description ({e})") from None
    if spec.get("combine", COMBINE) != COMBINE or not members:
        raise UserError(f"{path}: expected {{\"combine\": \"{COMBINE}\", \"members\": [...]}} with members")
    for m in members:
        if not m.is_dir():
            raise UserError(f"{m}: missing; the ensemble {root} lists it as a member")
    return members

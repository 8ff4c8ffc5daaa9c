"""Load a model export and predict from raw inputs (no Ray).

Example:
    >>> import mmray
    >>> p = mmray.load_model("runs/quickstart/export")
    >>> p.predict(images=[open("cat.png", "rb").read()], texts=["a small cat"])
    [{'label': 3, 'class_name': 'cat', 'probabilities': {'cat': 0.91, ...}}]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mmray import storage
from mmray.config import JobConfig, UserError, from_yaml_text
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decode import Preprocessor
from mmray.data.tokenizer import TextTokenizer
from mmray.export.codec import load_compressed_state, read_quantization
from mmray.export.writer import (
    CONFIG_FILE,
    ENCODERS_DIR,
    LABELS_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    hf_encoders,
    is_ensemble,
    read_members,
)
from mmray.models.builder import build_job_model, job_tasks
from mmray.models.model import ModelOutput
from mmray.train.checkpoint import STATE as CHECKPOINT_STATE
from mmray.train.checkpoint import load_model as load_checkpoint_model
from mmray.train.checkpoint import read_config as read_checkpoint_config
from mmray.train.device import channels_last_encoders, to_channels_last


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{path}: missing; a model export needs its {what} (is {path.parent} an export folder?)")
    return path


def read_labels(export_dir: Path) -> dict[str, list[str]]:
    """``labels.json`` -> ``{task: [class names]}``. Raises :class:`UserError` if missing or malformed."""
    path = _require(export_dir / LABELS_FILE, "class names")
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    ok = isinstance(labels, dict) and isinstance(labels.get("label"), list) and labels["label"]
    if not ok or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in labels.values()):
        raise UserError(f'{path}: expected {{"label": ["class name", ...], ...}}')
    return labels


def read_config(export_dir: Path) -> JobConfig:
    """The export's job config, with each Hugging Face encoder's ``path`` pointed at the architecture files the
    export carries (``encoders/<modality>/``), so loading never needs the original model folder, and without
    ``lora``: the export's weights have the adapters merged in (the model is built without them, no ``peft``)."""
    path = _require(export_dir / CONFIG_FILE, "resolved job config")
    config = from_yaml_text(path.read_bytes(), source=str(path))
    local = {m: enc.model_copy(update={"path": str(export_dir / ENCODERS_DIR / m), "lora": None})
             for m, enc in hf_encoders(config).items() if (export_dir / ENCODERS_DIR / m / "config.json").is_file()}
    if not local:  # an export written before it carried them still reads the original folder
        return config
    encoders = config.model.encoders.model_copy(update=local)
    return config.model_copy(update={"model": config.model.model_copy(update={"encoders": encoders})})


class Predictor:
    """A loaded model plus everything needed to turn raw inputs into predictions.

    Attributes:
        model: the ``MultimodalModel`` in eval mode on ``device``.
        config: the resolved :class:`JobConfig` the model was trained with.
        class_names: names of the main task's classes (index = label id).
        labels: ``{task: [class names]}`` for every task the model predicts.
        modalities: the modalities the model reads, sorted.
        tokenizer: the ``TextTokenizer`` (``None`` when text is not a modality).
        device: where the model runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: JobConfig,
        labels: Mapping[str, list[str]],
        tokenizer: Any,
        preprocessor: Any,
        device: torch.device,
    ):
        encoders = getattr(model, "encoders", {})  # an ensemble's members each have theirs
        to_channels_last(encoders, channels_last_encoders(config, encoders))  # NHWC convolutions, as in training
        self.model = model
        self.config = config
        self.labels = dict(labels)
        self.class_names: list[str] = list(labels["label"])
        self.modalities: tuple[str, ...] = tuple(config.data.modalities)
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.device = device

    # ------------------------------------------------------------------ decoded batches
    def predict_batch(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Class probabilities for an already-decoded batch (the reader's / pipeline's format).

        Args:
            batch: ``{"image": [B,3,S,S], "image_present": [B], "input_ids": [B,L], ...}`` as torch
                tensors or numpy arrays; keys the model does not read (``label``, ``id``) are ignored.

        Returns:
            ``float32 [B, C]`` probabilities on CPU (softmax over the main task's logits).
        """
        tensors = {
            k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v).to(self.device)
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) or (isinstance(v, np.ndarray) and v.dtype != object and v.dtype.kind != "U")
        }
        with torch.inference_mode():
            logits = self.model(tensors).logits["label"]
            return torch.softmax(logits.float(), dim=-1).cpu()

    # ------------------------------------------------------------------ raw inputs
    def decode_raw(
        self,
        images: Sequence[bytes | None] | None = None,
        texts: Sequence[str | None] | None = None,
        audios: Sequence[bytes | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Decode raw inputs into the model's batch format exactly as evaluation does (no augmentation).

        Raises:
            UserError: see :meth:`predict`.
        """
        given = {m for m, v in (("audio", audios), ("image", images), ("text", texts)) if v is not None}
        extra = sorted(given - set(self.modalities))
        if extra:
            raise UserError(f"this model reads {', '.join(self.modalities)}; it takes no {', '.join(extra)} inputs")
        if isinstance(texts, str):
            raise UserError("texts: expected a list of strings (one per row), got one string")
        return self.preprocessor.from_raw(images=images, texts=texts, audios=audios)

    def predict(
        self,
        images: Sequence[bytes | None] | None = None,
        texts: Sequence[str | None] | None = None,
        audios: Sequence[bytes | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Predict from raw inputs, one row per list entry.

        Args:
            images: encoded image files (PNG / JPEG / WebP bytes); ``None`` entries = missing image.
            texts: strings; ``None`` entries = missing text.
            audios: encoded WAV / FLAC bytes; ``None`` entries = missing audio.
            A modality not given at all is missing for every row.

        Returns:
            Per row ``{"label": int, "class_name": str, "probabilities": {class name: float}}``.

        Raises:
            UserError: lists of different lengths, a modality the model does not read, or an input
                that cannot be decoded (the message names the row and the reason).
        """
        given = [v for v in (images, texts, audios) if v is not None]
        if given and all(len(v) == 0 for v in given):
            return []
        probs = self.predict_batch(self.decode_raw(images=images, texts=texts, audios=audios))
        return [self._row(p) for p in probs]

    def _row(self, probs: torch.Tensor) -> dict[str, Any]:
        label = int(probs.argmax())
        return {
            "label": label,
            "class_name": self.class_names[label],
            "probabilities": {name: float(p) for name, p in zip(self.class_names, probs.tolist())},
        }

    def __repr__(self) -> str:
        return f"Predictor(modalities={list(self.modalities)}, classes={len(self.class_names)}, device={self.device})"


def load_trained(path: str | Path, *, config: JobConfig | None = None, device: str | torch.device = "cpu") -> Predictor:
    """The model and its preprocessing from a folder: a model export (:func:`load_model`) or a training
    checkpoint (a local folder holding ``state.pt``), as a :class:`Predictor` either way.

    A checkpoint's config is its own ``config.yaml`` unless ``config`` is given; its tokenizer and class names
    come from the job's dataset, as in training. A slim checkpoint's left-out encoders are rebuilt and verified
    (:func:`mmray.train.checkpoint.load_model`).

    Raises:
        UserError: a missing or unreadable folder, config or dataset; weights that do not fit.
    """
    if not (Path(path) / CHECKPOINT_STATE).is_file():
        return load_model(path, device)
    config = config or read_checkpoint_config(str(path))
    info = read_dataset_info(config.data.path)
    tokenizer = TextTokenizer.for_job(config.data, info)
    labels = {task: list(names) for task, names in info.tasks.items()}
    dev = torch.device(device)
    model = load_checkpoint_model(config, job_tasks(labels), tokenizer, str(path)).to(dev).eval()
    return Predictor(model, config, labels, tokenizer, _raw_preprocessor(config, tokenizer), dev)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load an export folder written by :func:`mmray.export.write_export`. Needs no Ray.

    Args:
        path: the export folder: a local path or a URI (``s3://``, ``gs://``; downloaded first).
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Returns:
        A :class:`Predictor` with the model in eval mode.

    Raises:
        UserError: the folder or one of its files is missing or unreadable, or the weights do not
            match the model the config describes.
    """
    if storage.is_uri(str(path)):  # everything is read into memory, so the download can go right after
        if not storage.is_dir(str(path)):
            raise UserError(f"{path}: no such model export folder")
        with storage.local_copy(str(path)) as local:
            return load_model(local, device)
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: no such model export folder")
    if is_ensemble(root):  # several members' probabilities averaged (mmray.export.ensemble)
        return load_ensemble(root, device)
    weights_path = _require(root / WEIGHTS_FILE, "weights")
    config = read_config(root)
    labels = read_labels(root)
    tokenizer = _load_tokenizer(root, config)
    dev = torch.device(device)

    # The same builder training uses, so the parameter names match the saved ones exactly.
    model = build_job_model(config, job_tasks(labels), tokenizer, pretrained=False)
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_path}: not a readable safetensors file: {e}") from None
    compressed = read_quantization(root)  # int8 / fp16 / bf16 copies written by `mmray export`
    if compressed is not None and compressed["mode"] == "int8" and dev.type != "cpu":
        raise UserError(f"{root}: an int8 export runs on CPU only; load it with device='cpu'")
    try:
        if compressed is None:
            model.load_state_dict(state, strict=True)
        else:
            load_compressed_state(model, state, compressed)
    except RuntimeError as e:
        raise UserError(f"{weights_path}: weights do not match the model in {root / CONFIG_FILE}: {e}") from None
    model.to(dev).eval()
    return Predictor(model, config, labels, tokenizer, _raw_preprocessor(config, tokenizer), dev)


def _raw_preprocessor(config: JobConfig, tokenizer: Any) -> Any:
    # Raw inputs are user data: a bad one is an error naming it, not a silently skipped row.
    return Preprocessor.for_raw(config.data.model_copy(update={"on_bad_record": "fail"}), tokenizer)


# ------------------------------------------------------------------ data-layer glue
def _load_tokenizer(root: Path, config: JobConfig) -> Any:
    if "text" not in config.data.modalities:
        return None
    return TextTokenizer.from_dir(str(_require(root / TOKENIZER_DIR, "tokenizer files")))


# ------------------------------------------------------------------ ensemble exports (written by mmray.export.ensemble)
class EnsembleModel(nn.Module):
    """Members' class probabilities averaged; ``logits`` = log of the mean (so softmax gives the mean back)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.members[0].tasks)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.members[0].modalities)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        outs = [m(batch) for m in self.members]
        logits = {t: torch.stack([o.logits[t].float().softmax(dim=-1) for o in outs]).mean(dim=0)
                  .clamp_min(torch.finfo(torch.float32).tiny).log() for t in outs[0].logits}
        return ModelOutput(logits, {}, torch.cat([o.fused for o in outs], dim=-1))


def load_ensemble(root: Path, device: str | torch.device):
    """The :class:`Predictor` of an ensemble export: its members loaded one by one."""
    loaded = [load_model(m, device) for m in read_members(root)]
    first = loaded[0]
    model = EnsembleModel([p.model for p in loaded]).eval()
    return Predictor(model, first.config, first.labels, first.tokenizer, first.preprocessor, first.device)

"""The job config schema: one typed model per section, validated once at the edge.

Every default lives here. Component sections (``model.encoders.*``, ``model.fusion``) are
discriminated unions built from the registries, so a registered component is immediately
selectable by name and its own keys are checked.
"""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from mmray.config.errors import UserError
from mmray.hf_local import image_settings, looks_local
from mmray.models.encoders import ENCODERS
from mmray.models.fusion import FUSIONS
from mmray.registry import StrictModel

MODALITIES: tuple[str, ...] = ("audio", "image", "text")
Modality = Literal["audio", "image", "text"]

# Metrics a run reports each epoch, usable for checkpoint ranking and early stopping.
METRICS: dict[str, str] = {
    "val.accuracy": "max",
    "val.f1": "max",
    "val.precision": "max",
    "val.recall": "max",
    "val.loss": "min",
    "train.loss": "min",
}


def _yaml_switch(value: Any) -> Any:
    """YAML 1.1 (PyYAML, and ``--set``) reads a bare ``on``/``off``/``yes``/``no`` as a boolean: back to the word."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# A setting whose choices include "on"/"off": `decode_cache: off` in a job file means the word, not False.
Switch = BeforeValidator(_yaml_switch)


def _component(registry, modality: str | None = None):
    types = registry.config_types(modality)
    return Annotated[Union[types], Field(discriminator="name")]  # type: ignore[valid-type]


ImageEncoder = _component(ENCODERS, "image")
TextEncoder = _component(ENCODERS, "text")
AudioEncoder = _component(ENCODERS, "audio")
Fusion = _component(FUSIONS)


# --------------------------------------------------------------------------------------- data
class ImagePreprocess(StrictModel):
    size: int = Field(32, ge=8, description="images are resized to size x size")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    augment: bool = Field(True, description="random shift and brightness jitter on the train split")


class TextPreprocess(StrictModel):
    tokenizer: Optional[str] = Field(
        None, description="Hugging Face tokenizer name or local path; null = the dataset's own tokenizer"
    )
    max_length: int = Field(32, ge=2)


class AudioPreprocess(StrictModel):
    sample_rate: int = Field(8000, ge=1000, description="waveforms are resampled to this rate")
    seconds: float = Field(1.0, gt=0, description="waveforms are cropped or zero-padded to this length")

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))


class DataConfig(StrictModel):
    path: str = Field(description="dataset directory (made by `mmray data synth` or `mmray data prepare`)")
    modalities: tuple[Modality, ...] = Field(MODALITIES, min_length=1)
    on_bad_record: Literal["skip", "fail"] = Field(
        "skip", description="a record that fails to decode is counted and skipped, or fails the run"
    )
    image: ImagePreprocess = ImagePreprocess()
    text: TextPreprocess = TextPreprocess()
    audio: AudioPreprocess = AudioPreprocess()
    prefetch_batches: int = Field(2, ge=0)
    decode_batch_size: int = Field(64, ge=1, description="rows per Ray Data decode task (64 measured best, see benchmarks)")
    decode_cpus: float = Field(
        0.5, gt=0, description="CPUs each Ray Data decode task reserves; fractional, so decoding still fits "
        "beside train workers and a sweep trial's driver on a small cluster"
    )
    shuffle: Literal["files", "local", "global", "none"] = Field(
        "local", description="training order, reseeded every epoch from train.seed: files = shards and row groups in "
        "a new order (rows within a row group stay together; full ingest speed); local = that, plus rows mixed in a "
        "buffer of shuffle_buffer_rows (costs ingest throughput on Ray, see README); global = a full shuffle of the "
        "split's rows every epoch (Ray Data random_shuffle: the whole split goes through the object store; in-process "
        "the whole split is held in memory); none = file order. Validation and test are never shuffled"
    )
    shuffle_buffer_rows: int = Field(
        1024, ge=1, description="rows mixed together with shuffle: local (at least train.batch_size)"
    )
    decode_cache: Annotated[Literal["auto", "on", "off"], Switch] = Field(
        "auto", description="decode each row once into DATA/.cache/decoded (uint8 pixels, resampled waveforms, token "
        "ids) and read every epoch, trial, sweep and evaluation from it; augmentation still runs every epoch. "
        "auto = when its estimated size (rows x decoded bytes per row) fits 16 GiB and half the free disk; "
        "on = whatever its size; off = decode every epoch (see README)"
    )

    @field_validator("modalities")
    @classmethod
    def _sorted_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"modalities repeat: {list(v)}")
        return tuple(sorted(v))


# -------------------------------------------------------------------------------------- model
DEFAULT_ENCODERS = {"image": "cnn", "text": "transformer", "audio": "mel_cnn"}
DEFAULT_FUSION = "concat"


def _fill_names(raw, defaults: dict[str, str]):
    """A component section without ``name`` means the default component (so ``--set model.fusion.dropout=0.2`` works)."""
    if isinstance(raw, dict):
        raw = dict(raw)
        for key, default in defaults.items():
            if isinstance(raw.get(key), dict) and "name" not in raw[key]:
                raw[key] = {"name": default, **raw[key]}
    return raw


class EncodersConfig(StrictModel):
    image: ImageEncoder = Field(default_factory=lambda: ENCODERS.entry(DEFAULT_ENCODERS["image"]).config())  # type: ignore[valid-type]
    text: TextEncoder = Field(default_factory=lambda: ENCODERS.entry(DEFAULT_ENCODERS["text"]).config())  # type: ignore[valid-type]
    audio: AudioEncoder = Field(default_factory=lambda: ENCODERS.entry(DEFAULT_ENCODERS["audio"]).config())  # type: ignore[valid-type]

    _defaults = model_validator(mode="before")(lambda raw: _fill_names(raw, DEFAULT_ENCODERS))


class ModelConfig(StrictModel):
    encoders: EncodersConfig = EncodersConfig()
    fusion: Fusion = Field(default_factory=lambda: FUSIONS.entry(DEFAULT_FUSION).config())  # type: ignore[valid-type]
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    _defaults = model_validator(mode="before")(lambda raw: _fill_names(raw, {"fusion": DEFAULT_FUSION}))


# -------------------------------------------------------------------------------------- train
class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="sgd only")


class LRScheduleConfig(StrictModel):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of all optimizer steps spent warming up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class EarlyStoppingConfig(StrictModel):
    # Off by default: under the default warm-up + cosine schedule the validation curve is noisy until the
    # learning rate has come down, and the late low-rate epochs are where it climbs (on the benchmark suite a
    # patience of 3 or 5 stopped runs 3-7 points short of the full schedule). The exported epoch is the best.
    patience: Optional[int] = Field(None, ge=1, description="epochs without improvement before stopping; null = off")
    min_delta: float = Field(0.0, ge=0)


class ContrastiveConfig(StrictModel):
    """CLIP-style InfoNCE between every pair of modalities, over the rows where both are present.

    An auxiliary loss (``weight``) and/or a pre-training phase (``pretrain_epochs``); both 0 = off.
    """

    weight: float = Field(
        0.0, ge=0, description="weight of the contrastive loss added to the supervised loss; 0 = not added"
    )
    pretrain_epochs: int = Field(
        0, ge=0, description="the first N of train.epochs train the encoders on the contrastive loss alone "
        "(fusion and heads frozen); they are not candidates for the best epoch or early stopping",
    )
    temperature: float = Field(0.07, gt=0, description="initial softmax temperature (CLIP: 0.07)")
    learn_temperature: bool = Field(True, description="learn the temperature (as CLIP's log logit scale)")
    max_logit_scale: float = Field(
        100.0, gt=1, description="the learned 1/temperature is clamped to at most this (CLIP: 100)"
    )
    projection_dim: Optional[int] = Field(
        None, gt=0, description="project each modality to this width (linear) before comparing; null = no "
        "projection when every encoder has the same output width, else the smallest width",
    )

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or self.pretrain_epochs > 0


class AdversarialConfig(StrictModel):
    """Adversarial training on the modality embeddings (encoder outputs, before fusion)."""

    method: Literal["none", "fgsm", "pgd"] = Field(
        "none", description="none; fgsm = one step of size epsilon along the loss gradient's sign; pgd = "
        "`steps` signed steps of `step_size`, projected to the epsilon L-inf ball",
    )
    epsilon: float = Field(0.05, gt=0, description="L-inf bound of the perturbation, in embedding units")
    steps: int = Field(3, ge=1, description="pgd only: gradient-sign steps")
    step_size: Optional[float] = Field(None, gt=0, description="pgd only: per-step size; null = 2.5 * epsilon / steps")
    random_start: bool = Field(
        True, description="pgd only: start from a uniform random point of the epsilon ball (Madry et al.), not zero"
    )
    weight: float = Field(1.0, ge=0, description="the loss on the perturbed embeddings is added with this weight")


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1, description="every epoch run, contrastive pre-training epochs included")
    batch_size: int = Field(64, ge=1, description="per worker")
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA when supported, fp32 on CPU"
    )
    compile: Annotated[Literal["off", "default", "reduce-overhead", "max-autotune"], Switch] = Field(
        "off", description="torch.compile the model with this mode; the first steps pay for compiling"
    )
    channels_last: Annotated[Literal["auto", "on", "off"], Switch] = Field(
        "auto", description="NHWC memory format for convolutional encoders (cnn, resnet*, mel_cnn): faster on CPU "
        "and CUDA; auto = those encoders, on = every encoder with a 2-D convolution (never with "
        "scaling.strategy: fsdp)"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    modality_dropout: float = Field(
        0.0, ge=0, lt=1, description="chance of hiding each modality of a training row (never all of a row's)"
    )
    task_weights: dict[str, float] = Field(
        default_factory=dict, description="loss weight per task (label, label_<task>); unlisted tasks weigh 1"
    )
    contrastive: ContrastiveConfig = ContrastiveConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    seed: int = 0
    max_failures: int = Field(
        0, ge=-1, description="times a lost or crashed worker group is restarted from the last checkpoint "
        "(Ray Train's FailureConfig); -1 = without limit"
    )
    embedding_cache: Annotated[Literal["auto", "off"], Switch] = Field(
        "auto", description="auto = train from cached encoder outputs while every encoder is frozen (the whole run, "
        "or until the first unfreeze_after_epochs) and no augmentation touches its inputs (built once per dataset; "
        "see README); off = always run encoders",
    )
    metric: Literal[tuple(METRICS)] = Field("val.accuracy", description="ranks checkpoints and drives early stopping")  # type: ignore[valid-type]
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()

    @field_validator("task_weights")
    @classmethod
    def _task_names(cls, v: dict[str, float]) -> dict[str, float]:
        for task, weight in v.items():
            if task != "label" and not task.startswith("label_"):
                raise ValueError(f"{task!r} is not a task; tasks are 'label' and 'label_<name>' columns")
            if weight < 0:
                raise ValueError(f"{task}: weight must be >= 0, got {weight}")
        return v

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    @model_validator(mode="after")
    def _pretrain_leaves_supervised_epochs(self) -> "TrainConfig":
        if self.contrastive.pretrain_epochs >= self.epochs:
            raise ValueError(
                f"train.contrastive.pretrain_epochs: {self.contrastive.pretrain_epochs} must be less than "
                f"train.epochs ({self.epochs}): pre-training epochs count within train.epochs"
            )
        return self


class ScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs reserved per train worker; leave the rest for Ray Data decoding"
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="with use_gpu; fractions share a GPU")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp = every worker holds the whole model (DistributedDataParallel); fsdp = weights, "
        "gradients and optimizer state sharded across the workers (FSDP2, per encoder block; needs "
        "num_workers >= 2; checkpoints saved sharded, the export whole; see README)"
    )


class CheckpointConfig(StrictModel):
    num_to_keep: int = Field(2, ge=1, description="best checkpoints kept by train.metric (the latest is kept too)")
    async_upload_mb: Optional[float] = Field(
        100, ge=0,
        description="an epoch's checkpoint of at least this many MB is uploaded to the run folder in the background "
        "while the next epoch trains (Ray Train runs; the run waits for the last upload before it ends, and a failed "
        "upload stops the run like a failed step); smaller ones, and all with null, are stored before the next "
        "epoch starts. 0: always in the background")


def _part(node: Any, key: str) -> Any:
    """``node[key]`` of a raw mapping or an already-built config section; None when absent."""
    if isinstance(node, dict):
        return node.get(key)
    return getattr(node, key, None)


def _same_source(a: str, b: str) -> bool:
    """Whether two tokenizer / model references name the same thing (local paths compared resolved)."""
    def norm(p: str) -> str:
        return os.path.realpath(os.path.expanduser(p)) if looks_local(p) else p.rstrip("/")

    return norm(a) == norm(b)


def _wire_hf_tokenizer(raw: Any) -> Any:
    """``hf_text`` tokenises with its own tokenizer: ``data.text.tokenizer`` unset -> the encoder's ``path``.

    Raises:
        ValueError: both are set and name different things (the ids would not match the model's embeddings).
    """
    if not isinstance(raw, dict):
        return raw
    text_encoder = _part(_part(_part(raw, "model"), "encoders"), "text")
    data = _part(raw, "data")
    path = _part(text_encoder, "path")
    if _part(text_encoder, "name") != "hf_text" or not isinstance(path, str) or data is None:
        return raw
    modalities = _part(data, "modalities")
    if modalities is not None and not isinstance(modalities, str) and "text" not in modalities:
        return raw  # the text encoder is not built
    tokenizer = _part(_part(data, "text"), "tokenizer")
    if tokenizer is not None:
        if isinstance(tokenizer, str) and not _same_source(tokenizer, path):
            raise ValueError(
                f"data.text.tokenizer: {tokenizer!r} differs from model.encoders.text.path: {path!r}; hf_text "
                "needs its own tokenizer: remove data.text.tokenizer (it defaults to the model's) or make them equal"
            )
        return raw
    if isinstance(data, DataConfig):
        return {**raw, "data": data.model_copy(update={"text": data.text.model_copy(update={"tokenizer": path})})}
    if not isinstance(data, dict):
        return raw  # not a mapping: field validation reports it
    text = data.get("text")
    if isinstance(text, TextPreprocess):
        text = text.model_copy(update={"tokenizer": path})
    elif text is None or isinstance(text, dict):
        text = {**(text or {}), "tokenizer": path}
    else:
        return raw  # not a mapping: field validation reports it
    return {**raw, "data": {**data, "text": text}}


def _wire_hf_image(raw: Any) -> Any:
    """``hf_image`` reads images as its image processor prepares them: ``data.image.size``, ``mean`` and ``std``
    unset -> the processor's (:func:`mmray.hf_local.image_settings`).

    A model folder that cannot be read here is left to the model-file check before the run starts (and an
    export's config carries the values written out).

    Raises:
        ValueError: one of them is set and differs from the processor's (naming the key and both values).
    """
    if not isinstance(raw, dict):
        return raw
    encoder = _part(_part(_part(raw, "model"), "encoders"), "image")
    data = _part(raw, "data")
    path = _part(encoder, "path")
    if _part(encoder, "name") != "hf_image" or not isinstance(path, str) or not isinstance(data, (dict, DataConfig)):
        return raw
    modalities = _part(data, "modalities")
    if modalities is not None and not isinstance(modalities, str) and "image" not in modalities:
        return raw  # the image encoder is not built
    try:
        wanted = _image_settings_cached(path)
    except UserError:
        return raw
    image = _part(data, "image")
    if isinstance(image, ImagePreprocess):
        given = {k: getattr(image, k) for k in image.model_fields_set if k in wanted}
        base = image.model_dump()
    elif image is None or isinstance(image, dict):
        given = {k: v for k, v in (image or {}).items() if k in wanted}
        base = dict(image or {})
    else:
        return raw  # not a mapping: field validation reports it
    for key, value in given.items():
        if not _same_setting(value, wanted[key]):
            raise ValueError(
                f"data.image.{key}: {_show(value)} differs from {_show(wanted[key])}, the {key} of the image "
                f"processor of model.encoders.image.path: {path!r}; remove data.image.{key} (it defaults to the "
                "model's) or make them equal")
    image_new = {**base, **wanted}
    if isinstance(data, DataConfig):
        return {**raw, "data": data.model_copy(update={"image": ImagePreprocess(**image_new)})}
    return {**raw, "data": {**data, "image": image_new}}


def _image_settings_cached(path: str) -> dict[str, Any]:
    key = os.path.realpath(os.path.expanduser(path)) if looks_local(path) else path
    if key not in _IMAGE_SETTINGS:
        _IMAGE_SETTINGS[key] = image_settings(path, "model.encoders.image.path")
    return _IMAGE_SETTINGS[key]


_IMAGE_SETTINGS: dict[str, dict[str, Any]] = {}  # one read of each processor per process (configs validate often)


def _same_setting(given: Any, wanted: Any) -> bool:
    if isinstance(wanted, tuple):
        try:
            return len(given) == len(wanted) and all(abs(float(a) - b) <= 1e-6 * max(1.0, abs(b))
                                                     for a, b in zip(given, wanted))
        except (TypeError, ValueError):
            return False
    return given == wanted


def _show(v: Any) -> str:
    return str([round(float(x), 8) for x in v]) if isinstance(v, (tuple, list)) else repr(v)


def embedding_cache_unusable(config: "JobConfig") -> str | None:
    """Why ``config`` cannot train from cached embeddings, or None when it can (``train.embedding_cache``; the
    embedding cache itself is :mod:`mmray.data.cache`, which asks this; so does ``scaling.strategy: fsdp``)."""
    if config.train.embedding_cache == "off":
        return "train.embedding_cache is off"
    for m in config.data.modalities:
        enc = getattr(config.model.encoders, m)
        if not enc.freeze:
            return f"model.encoders.{m}.freeze is false: the {m} encoder trains, so its outputs change every step"
    if "image" in config.data.modalities and config.data.image.augment:
        return ("data.image.augment is on: the frozen image encoder sees new pixels every epoch; "
                "set data.image.augment: false to train from the cache")
    if "://" in config.data.path:
        return f"data.path {config.data.path} is not on a local disk (the cache lives next to the dataset)"
    return None


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: Any, key: str) -> str:
    """A run or sweep name is one path component: it names a folder directly under the storage folder.

    Raises:
        UserError: naming ``key``: empty, a path (``/``, ``..``) or other characters than letters, digits,
            ``.``, ``_`` and ``-`` (starting with a letter or digit).
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"{key}: {name!r} is not a run name: a run or sweep name is one path component "
                        "(letters, digits, '.', '_' and '-', starting with a letter or digit; no '/' or '..')")
    return name


class JobConfig(StrictModel):
    name: str = Field(description="the run's name: one path component (the run folder under storage)")
    storage: str = Field("runs", description="local path or pyarrow URI (s3://, gs://) for runs")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    _hf_tokenizer = model_validator(mode="before")(_wire_hf_tokenizer)
    _hf_image = model_validator(mode="before")(_wire_hf_image)

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, v: str) -> str:
        try:
            return check_run_name(v, "name")
        except UserError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _contrastive_needs_pairs(self) -> "JobConfig":
        if self.train.contrastive.enabled and len(self.data.modalities) < 2:
            raise ValueError(
                f"train.contrastive: aligns pairs of modalities but data.modalities is {list(self.data.modalities)}; "
                "use two or more modalities or set train.contrastive.weight and pretrain_epochs to 0"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_composes(self) -> "JobConfig":
        """``scaling.strategy: fsdp`` with what it cannot work with, named (see :mod:`mmray.train.sharding`)."""
        if self.scaling.strategy != "fsdp":
            return self
        head = "scaling.strategy: 'fsdp'"
        if self.scaling.num_workers < 2:
            raise ValueError(
                f"{head} shards the model across workers, but scaling.num_workers is {self.scaling.num_workers}: "
                "one worker holds everything either way; set scaling.num_workers to 2 or more, or use "
                "scaling.strategy: ddp")
        if self.train.precision == "fp16":
            raise ValueError(
                f"{head} does not support train.precision: 'fp16' (loss scaling of sharded gradients); use "
                "'bf16', 'auto' or 'fp32', or scaling.strategy: ddp")
        if self.train.compile != "off":
            raise ValueError(
                f"{head} does not support train.compile: {self.train.compile!r}; set train.compile: off, or use "
                "scaling.strategy: ddp")
        if self.train.channels_last == "on":
            raise ValueError(
                f"{head} cannot shard channels-last (NHWC) convolution weights: train.channels_last: 'on'; set it "
                "to 'auto' (off with fsdp) or 'off', or use scaling.strategy: ddp")
        if embedding_cache_unusable(self) is None:
            frozen = ", ".join(f"model.encoders.{m}.freeze" for m in self.data.modalities)
            raise ValueError(
                f"{head} with every encoder frozen ({frozen}: true) and train.embedding_cache: 'auto': the run "
                "would train the fusion and heads from cached encoder outputs, leaving nothing worth sharding; "
                "use scaling.strategy: ddp (it trains from the cache), or set train.embedding_cache: 'off' to run "
                "the frozen encoders sharded")
        return self

    @model_validator(mode="after")
    def _gpu_precision(self) -> "JobConfig":
        if self.train.precision in ("bf16", "fp16") and not self.scaling.use_gpu:
            raise ValueError(
                f"train.precision: {self.train.precision!r} needs scaling.use_gpu: true; use 'auto' or 'fp32' on CPU"
            )
        return self

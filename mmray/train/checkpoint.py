"""Training checkpoints: weights as safetensors plus the state needed to resume.

A checkpoint folder holds ``model.safetensors`` (the unwrapped model's weights), ``state.pt``
(optimizer, LR schedule, grad scaler, epoch, early-stopping state) and ``config.yaml`` (the resolved job
config that produced it). ``state.pt`` is written by ``torch.save`` but only ever read with
``torch.load(weights_only=True)`` (:func:`read_state`): tensors, numbers, strings, lists, tuples and dicts
and nothing else, so a pickle planted in shared or object storage never runs code on whoever resumes,
exports, reports or compares that run; it is refused, naming the file.

Slim checkpoints: the weights of permanently frozen encoders never change during a run, so they are left
out of ``model.safetensors`` (a frozen ResNet-18 + MiniLM is 135 MB per epoch; the fusion and heads
are usually well under 1 MB). ``frozen.json`` names each left-out module with the sha256 of its weights
(:func:`mmray.models.hashing.weights_hash`); :func:`load_model` rebuilds them as training did
(:func:`mmray.models.builder.build_as_trained`) and :func:`load_weights` refuses a rebuild whose hash differs,
so a checkpoint never silently pairs trained heads with other encoder weights. Exports always hold the
full model.

LoRA: an encoder trained through adapters (``model.encoders.<m>.lora``) keeps its pretrained weights as
loaded, so its checkpoints hold only the adapters (and everything else that trains); ``frozen.json``'s
``lora_base`` maps the encoder to the sha256 of the weights left out (:func:`mmray.models.lora.base_hash`),
verified the same way when the checkpoint is loaded.

Sharded checkpoints (``scaling.strategy: fsdp``): the weights and the optimizer state are saved by every worker,
each its own shard, with torch distributed checkpoint instead of ``model.safetensors`` and ``state.pt``'s
optimizer: ``__<rank>_0.distcp`` files and the index ``.metadata`` (written by rank 0), all in the one
checkpoint folder (Ray Train merges the workers' files). The keys are the plain model's, under ``model.``
and ``optimizer.`` (frozen and LoRA base weights left out as above); ``state.pt``, ``config.yaml`` and
``frozen.json`` are as in a full checkpoint. A resumed sharded run reads back its shards whatever the workers'
count; :func:`load_model` reads a sharded checkpoint into one whole model in one process, so the export (and
everything that loads a checkpoint) sees the same model a DDP run would give.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mmray import storage as store
from mmray.config import JobConfig, from_yaml_text, to_yaml
from mmray.config.errors import RunError, UserError
from mmray.models.builder import build_as_trained, build_job_model
from mmray.models.hashing import weights_hash
from mmray.models.lora import base_hash, base_parameter_names
from mmray.train.sharding import is_sharded

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"
FROZEN = "frozen.json"
PREFIX = "checkpoint_epoch_"
SHARDS_INDEX = ".metadata"  # torch distributed checkpoint's index of the shard files of a sharded checkpoint


def checkpoint_name(epoch: int) -> str:
    """The folder name of ``epoch``'s checkpoint: ``checkpoint_epoch_NNNN``."""
    return f"{PREFIX}{epoch:04d}"


def epoch_of(name: str) -> int | None:
    """The epoch of the checkpoint folder named ``name`` (``checkpoint_epoch_0003`` -> 3; a path's last part
    counts); None for another name."""
    base = os.path.basename(name.rstrip("/"))
    digits = base[len(PREFIX):]
    return int(digits) if base.startswith(PREFIX) and digits.isdigit() else None


def kept_checkpoints(run_dir: str) -> dict[int, str]:
    """epoch -> folder of the checkpoints a run kept (local path or URI; {} when there are none)."""
    return {epoch_of(d): store.join(run_dir, d) for d in store.listdir(run_dir) if epoch_of(d) is not None}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _under(key: str, prefixes) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def state_dict_for_saving(model: nn.Module, leave_out=(), lora_base=()) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights on CPU, without the modules named in ``leave_out`` (dotted prefixes) and
    without the base weights of the LoRA-adapted modules named in ``lora_base``."""
    inner = unwrap(model)
    skip = _base_keys(inner, lora_base)
    # safetensors refuses shared storage and non-contiguous tensors; clone makes each tensor its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in inner.state_dict().items()
            if not _under(k, leave_out) and k not in skip}


def _base_keys(inner: nn.Module, modules) -> set[str]:
    """State-dict keys of the base (non-training) weights of the LoRA-adapted ``modules`` of ``inner``."""
    return {f"{m}.{n}" for m in modules for n in base_parameter_names(inner.get_submodule(m))}


@dataclass
class TrainState:
    """Everything beyond the weights that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: JobConfig,
    frozen: dict[str, str] | None = None,
    lora_base: dict[str, str] | None = None,
) -> str:
    """Write a checkpoint folder at ``path``; ``frozen`` maps module name (``encoders.image``) -> weights hash
    of modules left out of it, ``lora_base`` LoRA-adapted module name -> hash of its base weights, left out
    too (see the module docstring).

    A sharded model (``scaling.strategy: fsdp``) is saved by every rank, each writing its shards into its own
    ``path`` (the folders are merged into one); rank 0 also writes the rest."""
    os.makedirs(path, exist_ok=True)
    sharded = is_sharded(model)
    if sharded:
        _save_shards(path, model, optimizer, leave_out=frozen or (), lora_base=lora_base or ())
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return path
    else:
        store.save_weights(state_dict_for_saving(model, leave_out=frozen or (), lora_base=lora_base or ()),
                           os.path.join(path, WEIGHTS))
    if frozen or lora_base:
        with open(os.path.join(path, FROZEN), "w") as f:
            json.dump({"left_out": frozen or {}, "lora_base": lora_base or {},
                       "why": "permanently frozen (left_out) or the pretrained weights under LoRA adapters "
                       "(lora_base): rebuilt from the job config and verified by sha256 when loaded"},
                      f, indent=1, sort_keys=True)
    torch.save(
        {
            "optimizer": None if sharded else optimizer.state_dict(),  # sharded: in the shard files
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_state": state.__dict__,
        },
        os.path.join(path, STATE),
    )
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(to_yaml(config))
    return path


def _save_shards(path: str, model: nn.Module, optimizer, *, leave_out, lora_base) -> None:
    """Every rank: its shards of the weights (without ``leave_out`` and the ``lora_base`` base weights) and of
    the optimizer state, by torch distributed checkpoint, into ``path`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    skip = _base_keys(unwrap(model), lora_base)
    model_state = {k: v for k, v in model_state.items() if not _under(k, leave_out) and k not in skip}
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def is_sharded_checkpoint(path: str) -> bool:
    """Whether the checkpoint folder ``path`` (a local path or a URI) was saved sharded (``scaling.strategy: fsdp``)."""
    return store.exists(store.join(path, SHARDS_INDEX))


def _saved_keys(path: str) -> set[str]:
    """The flattened keys (``model.<name>``, ``optimizer.state.<name>.<what>``, ...) a sharded checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _load_shards(path: str, model: nn.Module, optimizer=None) -> None:
    """Read the sharded checkpoint at ``path`` into ``model`` (sharded or whole; on every rank of a sharded one,
    a collective) and ``optimizer``; the left-out modules and LoRA base weights keep the values ``model`` has.

    Raises:
        RuntimeError: the checkpoint's weights do not fit the model (missing or unexpected names).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    inner = unwrap(model)
    saved = _saved_keys(path)
    skip = _base_keys(inner, lora_bases(path))
    frozen = left_out(path)
    if optimizer is None:
        model_state, optimizer_state = get_model_state_dict(model), None
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
    wanted = {k: v for k, v in model_state.items() if not _under(k, frozen) and k not in skip}
    saved_model = {k[len("model."):] for k in saved if k.startswith("model.")}
    missing, unexpected = sorted(set(wanted) - saved_model), sorted(saved_model - set(wanted))
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    blob: dict[str, Any] = {"model": wanted}
    if optimizer_state is not None:
        # parameters that had not trained yet when it was saved (an encoder still frozen) have no state there
        optimizer_state["state"] = {name: st for name, st in optimizer_state["state"].items()
                                    if any(k.startswith(f"optimizer.state.{name}.") for k in saved)}
        blob["optimizer"] = optimizer_state
    import warnings

    import torch.distributed as dist

    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # one process (the export, evaluate) reads whole tensors from every shard file:
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # DCP warns that this is meant
        dcp.load(blob, checkpoint_id=path, no_dist=single)
    options = StateDictOptions(strict=False)
    if optimizer is None:
        set_model_state_dict(model, wanted, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=wanted, optim_state_dict=blob["optimizer"], options=options)


class StorageFullError(RunError):
    """The disk (or quota) filled up while an epoch's checkpoint was written. The partial checkpoint is
    removed, never registered; a resume continues from ``resume_epoch``'s checkpoint."""

    def __init__(self, path: str, epoch: int, resume_epoch: int):
        self.path, self.epoch, self.resume_epoch = path, epoch, resume_epoch
        start = f"epoch {resume_epoch}'s checkpoint" if resume_epoch else "the start"
        super().__init__(f"storage full at {path} while writing epoch {epoch}'s checkpoint (the partial "
                         f"checkpoint was removed); free some space and run the same command again: the resume "
                         f"continues from {start}")

    def __reduce__(self):  # pickles across Ray workers
        return (type(self), (self.path, self.epoch, self.resume_epoch))


def is_storage_full(error: BaseException) -> bool:
    """Whether ``error`` is a disk-full or over-quota failure (``ENOSPC`` / ``EDQUOT``; pyarrow says it in words)."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def copy_checkpoint(local: str, target: str) -> str:
    """Copy the checkpoint folder ``local`` to ``target`` (a local path or a URI) so that no reader ever sees it
    half-written: a local copy is made in a hidden sibling and renamed into place; to a URI, ``state.pt`` is
    uploaded last (objects appear whole), and a checkpoint without it is not one (:func:`is_complete`).
    Returns ``target``."""
    import shutil

    if store.is_uri(target):
        for name in sorted(os.listdir(local), key=lambda n: n == STATE):
            store.upload(os.path.join(local, name), store.join(target, name))
        return target
    parent, name = os.path.split(os.path.normpath(target))
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")  # hidden: kept_checkpoints never lists it
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(local, tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def folder_mb(path: str) -> float:
    """The size of the local checkpoint folder ``path`` in MB (10^6 bytes)."""
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) / 1e6


def uploads_in_background(path: str, async_upload_mb: float | None) -> bool:
    """Whether the local checkpoint folder ``path`` is uploaded while the next epoch trains
    (``checkpoint.async_upload_mb``: at least that many MB; None never)."""
    return async_upload_mb is not None and folder_mb(path) >= async_upload_mb


class CheckpointUploadError(RunError):
    """Storing an epoch's checkpoint in the run folder failed while the next epoch trained (a background
    upload). The run stops like a failed step: under ``train.max_failures`` it restarts from the last checkpoint
    that was stored; otherwise a resume continues from it."""

    def __init__(self, target: str, epoch: int, reason: str):
        self.target, self.epoch, self.reason = target, epoch, reason
        before = f"epoch {epoch - 1}'s checkpoint" if epoch > 1 else "the start"
        super().__init__(f"uploading epoch {epoch}'s checkpoint to {target} failed in the background: {reason}; "
                         f"the run stopped (the partial checkpoint was removed). Run the same command again: the "
                         f"resume continues from the last checkpoint stored, {before} or earlier")

    def __reduce__(self):  # pickles across Ray workers
        return (type(self), (self.target, self.epoch, self.reason))


def upload_checkpoint(local: str, target: str, persist, *, attempts: int = 3, backoff_s: float = 1.0) -> Any:
    """Store the local checkpoint folder ``local`` at ``target`` (in the run folder) with ``persist()`` (the
    storage's copy; its result is returned), then delete ``local``. For copies made off the training thread,
    whose errors nobody else would see: a failed copy is tried again (``attempts`` in all, for an object store's
    passing errors), except on a full disk; the last failure removes the partial copy at ``target``, deletes
    ``local`` and raises one error naming the epoch: :class:`StorageFullError` or :class:`CheckpointUploadError`
    (whose text never asks a caller to retry: ``local`` is gone)."""
    import shutil
    import time

    epoch = epoch_of(target) or 0
    try:
        for attempt in range(1, attempts + 1):
            try:
                return persist()
            except Exception as e:
                with contextlib.suppress(Exception):  # the copy's own error is the one to report
                    store.remove(target)
                if is_storage_full(e):
                    raise StorageFullError(getattr(e, "filename", None) or target, epoch, max(0, epoch - 1)) from e
                if attempt == attempts:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    # Ray Train retries a copy whose error names a passing AWS error ("AWS Error SLOW_DOWN"):
                    # this one is final, so its text must not match.
                    reason = f"{type(e).__name__}: {first}".replace("AWS Error", "AWS error").rstrip(": ")
                    raise CheckpointUploadError(target, epoch, reason) from e
                time.sleep(backoff_s * attempt)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def is_complete(path: str) -> bool:
    """Whether the checkpoint folder ``path`` (local path or URI) was written whole (it has its ``state.pt``)."""
    return store.exists(store.join(path, STATE))


def left_out(path: str) -> dict[str, str]:
    """Module name -> weights hash of the frozen modules the checkpoint at ``path`` leaves out ({} for a full one)."""
    return _frozen_json(path).get("left_out", {})


def lora_bases(path: str) -> dict[str, str]:
    """LoRA-adapted module name -> hash of the base weights the checkpoint at ``path`` leaves out ({} if none)."""
    return _frozen_json(path).get("lora_base", {})


def _frozen_json(path: str) -> dict[str, dict[str, str]]:
    file = os.path.join(path, FROZEN)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        blob = json.load(f)
    return {k: dict(blob.get(k) or {}) for k in ("left_out", "lora_base")}


def load_weights(path: str, model: nn.Module, *, verify: bool = True) -> None:
    """Load the checkpoint at ``path`` (full or sharded) into ``model`` in place.

    For a slim checkpoint, ``model`` must already hold the left-out frozen modules as training had them
    (:func:`load_model` builds it so); with ``verify`` their hashes are checked. Ranks other than 0 pass
    ``verify=False``: their frozen copies were seeded differently and DDP has already replaced them with rank 0's.

    Raises:
        UserError: a left-out module of ``model`` differs from the one the checkpoint was trained with.
    """
    inner = unwrap(model)
    frozen, bases = left_out(path), lora_bases(path)
    if is_sharded_checkpoint(path):
        _load_shards(path, model)
    else:
        saved = load_file(os.path.join(path, WEIGHTS))
        if not frozen and not bases:
            inner.load_state_dict(saved)
            return
        missing, unexpected = inner.load_state_dict(saved, strict=False)
        base_keys = _base_keys(inner, bases)
        stray = [k for k in missing if not _under(k, frozen) and k not in base_keys]
        if stray or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not fit the model: missing {stray[:5]}, "
                               f"unexpected {unexpected[:5]}")
    if verify:
        verify_left_out(path, lambda name, hash_of: hash_of(inner.get_submodule(name)))


def verify_left_out(path: str, actual_hash) -> None:
    """Check the modules the checkpoint at ``path`` left out against the hashes it recorded;
    ``actual_hash(module name, hash function)`` gives the hash of the module the loading model has.

    Raises:
        UserError: a left-out module differs from the one the checkpoint was trained with.
    """
    frozen, bases = left_out(path), lora_bases(path)
    checks = [(name, digest, weights_hash, "frozen weights") for name, digest in sorted(frozen.items())]
    checks += [(name, digest, base_hash, "pretrained weights under the LoRA adapters")
               for name, digest in sorted(bases.items())]
    for name, digest, hash_of, what in checks:
        actual = actual_hash(name, hash_of)
        if actual != digest:
            raise UserError(
                f"{path} leaves out the {what} of {name} (sha256 {digest[:12]}), and rebuilding them from "
                f"the job config gives other weights ({actual[:12]}): the pretrained weights file, the encoder's "
                "config or the torch version changed since training. Restore them, or train again.")


def load_model(config: JobConfig, tasks: dict[str, int], tokenizer: Any, path: str) -> nn.Module:
    """The job's model with the checkpoint at ``path`` (a local folder) loaded, slim or full."""
    # A full checkpoint overwrites every weight: no need to read pretrained files. A slim one needs them.
    model = build_as_trained(config, tasks, tokenizer) if left_out(path) or lora_bases(path) else \
        build_job_model(config, tasks, tokenizer, pretrained=False)
    load_weights(path, model)
    return model


def read_state(path: str) -> dict[str, Any]:
    """The ``state.pt`` of the checkpoint folder ``path`` (a local path or a URI): ``optimizer``,
    ``scheduler``, ``scaler`` and ``train_state`` (epoch, history, best epoch, ...).

    Read with ``weights_only=True``: plain containers, numbers, strings and tensors only, never an
    arbitrary pickle (see the module docstring).

    Raises:
        UserError: the file is not such a state (a planted or damaged pickle), naming it; nothing in it ran.
    """
    file = store.join(path, STATE)
    with store.local_copy(file) as local:
        try:
            blob = torch.load(local, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{file}: not a training state mmray wrote (refused to unpickle it: {first}); "
                            "nothing in it was run. Delete that checkpoint folder to resume from the one "
                            "before, or train under another --name") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("train_state"), dict):
        raise UserError(f"{file}: not a training state mmray wrote (no train_state); delete that checkpoint "
                        "folder to resume from the one before, or train under another --name")
    return blob


def read_train_state(checkpoint_dir: str) -> dict[str, Any]:
    """The loop's train state saved in a checkpoint folder (a local path or a URI): epoch, history, ..."""
    return read_state(checkpoint_dir)["train_state"]


def checkpoint_epoch(checkpoint_dir: str) -> int:
    """The epoch whose end the checkpoint at ``checkpoint_dir`` (a local path or a URI) holds."""
    return int(read_train_state(checkpoint_dir)["epoch"])


def read_config(checkpoint_dir: str) -> JobConfig:
    """The resolved job config saved with the checkpoint at ``checkpoint_dir`` (a local folder).

    Raises:
        UserError: the checkpoint has no ``config.yaml``.
    """
    path = os.path.join(checkpoint_dir, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; cannot tell which model the checkpoint holds")
    with open(path) as f:
        return from_yaml_text(f.read(), source=path)


def load_checkpoint(path: str, *, model, optimizer, scheduler, scaler, verify: bool = True,
                    hashes: dict[str, str] | None = None) -> TrainState:
    """Restore weights and optimizer/schedule state in place; returns the saved :class:`TrainState`.

    A sharded model reads a sharded checkpoint (every rank calls this); its left-out modules are verified
    against ``hashes`` (module name -> hash of the module as built, before sharding), when ``verify``.

    Raises:
        UserError: ``state.pt`` is not a plain training state (:func:`read_state`), or a sharded checkpoint
            meets a whole model or the other way round (the run changed ``scaling.strategy``).
    """
    blob = read_state(path)  # before the weights: a planted state file stops the resume at once
    if is_sharded(model) != is_sharded_checkpoint(path):
        raise UserError(strategy_mismatch(path, is_sharded_checkpoint(path)))
    if is_sharded(model):
        _load_shards(path, model, optimizer)
        if verify:
            verify_left_out(path, lambda name, hash_of: (hashes or {}).get(name, ""))
    else:
        load_weights(path, model, verify=verify)
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    return TrainState(**blob["train_state"])


def strategy_mismatch(path: str, sharded: bool) -> str:
    """The message for resuming a checkpoint written under the other ``scaling.strategy``."""
    was, now = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
    return (f"scaling.strategy: {now!r}, but the checkpoint to resume from, {path}, was written by a "
            f"scaling.strategy: {was!r} run; resume with scaling.strategy: {was!r}, or train under a new --name")

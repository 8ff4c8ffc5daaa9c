"""What the training loop needs from its surroundings, so the loop itself never imports Ray.

:class:`WorkerContext` is implemented twice: :class:`LocalContext` here (one process, the local
Parquet reader; used by tests, by in-process sweep trials and on a laptop with no cluster) and
``RayWorkerContext`` in :mod:`mmray.train.trainer` (Ray Train workers fed by Ray Data).
:class:`LoopInputs` is what a run reads besides its config and context, planned once by whoever starts it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

from mmray.train.checkpoint import copy_checkpoint, kept_checkpoints

if TYPE_CHECKING:
    from mmray.data.cache import CachePlan

Batch = dict[str, Any]


@dataclass(frozen=True)
class LoopInputs:
    """What one loop run reads besides its config and its context: planned once per run by whoever starts it
    (``mmray.fit``, a sweep trial) and passed down unchanged to every worker (it pickles).

    Attributes:
        cached_encoders: the embedding cache: modality -> weights hash of the encoder that filled it. Batches of
            the epochs it serves hold those encoders' outputs (``<m>.pooled``) instead of raw inputs, and the
            loop checks its own encoders against these hashes. Empty: no cache.
        cached_epochs: a partial cache serves epochs ``1..cached_epochs`` only; later epochs decode the dataset
            and run the encoders. None: every epoch it is used for.
    """

    cached_encoders: Mapping[str, str] = field(default_factory=dict)
    cached_epochs: int | None = None

    @classmethod
    def from_cache(cls, cache: "CachePlan") -> "LoopInputs":
        """The inputs of a run that trains from ``cache`` when it is used (:func:`mmray.data.cache.plan`)."""
        if not cache.used:
            return cls()
        return cls(dict(cache.weights or {}), cache.epochs if cache.partial else None)

    def from_cache_in(self, epoch: int) -> bool:
        """Whether ``epoch``'s batches are the embedding cache's (the cached encoders do not run)."""
        return bool(self.cached_encoders) and (self.cached_epochs is None or epoch <= self.cached_epochs)


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device
    run_dir: str  # the run's folder: TensorBoard files go under it

    def train_batches(self, epoch: int) -> Iterable[Batch]: ...
    def val_batches(self, epoch: int) -> Iterable[Batch]: ...
    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum across workers (identity with one worker)."""
        ...
    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's ``t`` (same shape on all) in rank order, without gradient ([t] with one worker)."""
        ...
    def keep(self, checkpoint_dir: str) -> str | None:
        """Rank 0, before the epoch's record (``metrics.jsonl``) is written: make the checkpoint durable
        where :meth:`resume_checkpoint` will find it, so a recorded epoch always has its checkpoint. Returns
        that durable copy, or None where :meth:`report` is what stores it."""
        ...
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Publish one epoch's metrics and (from rank 0) its checkpoint folder. A barrier across workers.
        The folder is the context's once this returns (the caller deletes what is left of it): it may
        have moved it away to store it in the background."""
        ...
    def resume_checkpoint(self) -> ContextManager[str | None]:
        """A local folder holding the checkpoint to resume from (None for a fresh start), for the ``with``
        block only: a temporary copy is deleted when it ends, also on failure."""
        ...
    def progress(self, event: dict[str, Any]) -> None:
        """Non-blocking progress event (rank 0) for the person watching."""
        ...


class LocalContext:
    """Single-process context: reads Parquet shards directly, keeps checkpoints in ``run_dir``.

    Args:
        run_dir: folder for checkpoints (``checkpoint_epoch_NNNN``) and TensorBoard files.
        train_batches / val_batches: ``epoch -> iterable of batches``.
        on_report: called with ``(metrics, checkpoint_path)`` after each epoch.
        on_progress: called with progress events.
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        run_dir: str,
        train_batches: Callable[[int], Iterable[Batch]],
        val_batches: Callable[[int], Iterable[Batch]],
        *,
        device: str | torch.device = "cpu",
        on_report: Callable[[dict[str, float], str | None], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.run_dir = run_dir
        self.device = torch.device(device)
        self._train, self._val = train_batches, val_batches
        self._on_report, self._on_progress = on_report, on_progress
        self.history: list[dict[str, float]] = []
        self.checkpoints: list[str] = []

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        return self._train(epoch)

    def val_batches(self, epoch: int) -> Iterable[Batch]:
        return self._val(epoch)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def keep(self, checkpoint_dir: str) -> str:
        """Copy the checkpoint into ``run_dir`` (whole or not at all: :func:`copy_checkpoint`)."""
        path = os.path.join(self.run_dir, os.path.basename(checkpoint_dir))
        if os.path.abspath(path) != os.path.abspath(checkpoint_dir):
            copy_checkpoint(checkpoint_dir, path)
        return path

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        path = None
        if checkpoint_dir is not None:
            path = os.path.join(self.run_dir, os.path.basename(checkpoint_dir))
            if not os.path.isdir(path):
                self.keep(checkpoint_dir)
            self.checkpoints.append(path)
        self.history.append(dict(metrics))
        if self._on_report:
            self._on_report(metrics, path)

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        kept = kept_checkpoints(self.run_dir) if os.path.isdir(self.run_dir) else {}
        yield kept[max(kept)] if kept else None

    def progress(self, event: dict[str, Any]) -> None:
        if self._on_progress:
            self._on_progress(event)

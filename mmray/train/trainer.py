"""The thin Ray layer around the loop: Ray Data in, ``TorchTrainer`` workers, progress out, export at the end."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmray import storage as store
from mmray.config import JobConfig
from mmray.runtime import ensure_ray
from mmray.train.loop import train_loop

RAW_SUFFIX = "_decoded"  # datasets read from the shards when a partial embedding cache serves the first epochs


class RayWorkerContext:
    """:class:`~mmray.train.context.WorkerContext` for a Ray Train worker."""

    def __init__(self, config: JobConfig, run_dir: str, relay: Any):
        import ray.train
        import ray.train.torch
        from ray.data import DataContext

        # Split coordinators and streaming executors inside workers would each draw progress bars.
        DataContext.get_current().enable_progress_bars = False
        _silence_report_log()
        tc = ray.train.get_context()
        self.rank, self.world_size = tc.get_world_rank(), tc.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir
        self._config, self._relay = config, relay
        self.cache_epochs: int | None = None  # a partial embedding cache: the epochs it serves

    def _batches(self, split: str, train: bool, epoch: int):
        import ray.train

        bs = self._config.train.batch_size
        if self.cache_epochs is not None and epoch > self.cache_epochs:
            split = f"{split}{RAW_SUFFIX}"  # the embedding cache served the epochs before: decode from now on
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=bs,
            prefetch_batches=self._config.data.prefetch_batches,
            local_shuffle_buffer_size=4 * bs if train else None,
            pin_memory=self.device.type == "cuda",
        )

    def train_batches(self, epoch: int):
        return self._batches("train", train=True, epoch=epoch)

    def val_batches(self, epoch: int):
        return self._batches("val", train=False, epoch=epoch)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t)
        return out

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = os.path.basename(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.to_directory() if checkpoint is not None else None

    def progress(self, event: dict[str, Any]) -> None:
        if self.rank == 0 and self._relay is not None:
            self._relay.push.remote(event)


def _silence_report_log() -> None:
    """Ray Train logs every report (the whole metrics dict, per rank) at INFO under a logger named by its
    file path, outside ``ray.train``'s level control; mmray prints its own epoch line instead."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_worker(loop_config: dict[str, Any]) -> None:
    config = JobConfig.model_validate(loop_config["config"])
    ctx = RayWorkerContext(config, loop_config["run_dir"], loop_config["relay"])
    ctx.cached_encoders = loop_config.get("cached_encoders")  # embedding cache: weights its batches came from
    ctx.cache_epochs = loop_config.get("cache_epochs")
    train_loop(config, ctx)


def _progress_relay():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressRelay:
        """Holds rank 0's progress events until the driver collects them."""

        def __init__(self):
            self.events: list[dict[str, Any]] = []

        def push(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def drain(self) -> list[dict[str, Any]]:
            events, self.events = self.events, []
            return events

    return ProgressRelay.remote()


@dataclass
class FitOutcome:
    run_dir: str
    best_checkpoint: str | None  # local path or URI of the best checkpoint folder
    error: BaseException | None


def fit(config: JobConfig, *, run_dir: str, on_event: Callable[[dict[str, Any]], None] | None = None,
        callbacks: list | None = None, cache=None, decoded=None) -> FitOutcome:
    """Run the job on Ray Train; returns where the best checkpoint is (by ``train.metric``).

    ``callbacks`` are Ray Train ``UserCallback``s (a sweep passes Tune's report callback). ``cache`` is the
    :class:`~mmray.data.cache.CachePlan` to train from, ``decoded`` the :class:`~mmray.data.decoded.DecodePlan`
    whose cached inputs replace decoding; None looks each up (never builds: runs and sweeps build first).
    """
    ray = ensure_ray()
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.pipeline import build_dataset, build_decoded_dataset

    info = read_dataset_info(config.data.path)
    cache = _embedding_cache(config, info, cache, on_event)
    inputs = _decode_cache(config, info, decoded, cache, on_event)

    def decoded(suffix: str = "") -> dict:
        def split(name: str, train: bool):
            if inputs.used:
                return build_decoded_dataset(config.data, info, inputs.entry, name, train=train, seed=config.train.seed)
            return build_dataset(config.data, info, name, train=train, seed=config.train.seed)
        return {f"train{suffix}": split("train", True), f"val{suffix}": split("val", False)}

    if cache.used:
        from mmray.data.cache import build_cached_dataset

        datasets = {
            "train": build_cached_dataset(cache.entries, "train", train=True, seed=config.train.seed),
            "val": build_cached_dataset(cache.entries, "val", train=False),
        }
        if cache.partial:  # the encoders unfreeze after cache.epochs: those epochs decode the dataset
            datasets |= decoded(RAW_SUFFIX)
    else:
        datasets = decoded()
    relay = _progress_relay() if on_event else None
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    run_dir = store.normalize(run_dir)
    storage, name = store.split(run_dir)  # a local folder or a URI: Ray Train writes to either
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_dir": run_dir, "relay": relay,
                           "cached_encoders": cache.weights, "cache_epochs": cache.epochs if cache.partial else None},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=s.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoint.num_to_keep,
                checkpoint_score_attribute=config.train.metric,
                checkpoint_score_order=config.train.mode),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )
    stop = threading.Event()
    poller = None
    if relay is not None:
        def poll() -> None:
            while not stop.wait(0.5):
                for event in ray.get(relay.drain.remote()):
                    on_event(event)
            for event in ray.get(relay.drain.remote()):
                on_event(event)
        poller = threading.Thread(target=poll, name="mmray-progress", daemon=True)
        poller.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=5)
    best = result.get_best_checkpoint(metric=config.train.metric, mode=config.train.mode) if result.metrics else None
    # Ray's checkpoint path is inside its filesystem (no scheme): name it under run_dir instead
    best_path = store.join(run_dir, os.path.basename(best.path.rstrip("/"))) if best else None
    return FitOutcome(run_dir, best_path, result.error)


def _decode_cache(config: JobConfig, info, decoded, cache, on_event):
    """The decoded-input cache plan (looked up when not given), announced in the run's log."""
    from mmray.data.decoded import plan

    if decoded is None:
        decoded = plan(config, info, build=False, embedding=cache)
    if on_event is not None:
        on_event({"type": "decode_cache", "line": decoded.line()})
    else:
        print(f"mmray {decoded.line()}", flush=True)
    return decoded


def _embedding_cache(config: JobConfig, info, cache, on_event):
    """The cache plan (looked up when not given), announced in the run's log."""
    from mmray.data.cache import plan

    if cache is None:
        cache = plan(config, info, build=False)
    if on_event is not None:
        on_event({"type": "embedding_cache", "line": cache.line()})
    else:
        print(f"mmray {cache.line()}", flush=True)
    return cache

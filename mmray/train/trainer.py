"""The thin Ray layer around the loop: Ray Data in, ``TorchTrainer`` workers, progress out, export at the end."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmray import storage as store
from mmray.config import JobConfig
from mmray.config.errors import find_error
from mmray.data.cache import build_cached_dataset, plan
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.decoded import build_decoded_dataset
from mmray.data.decoded import plan as decode_plan
from mmray.runtime import ensure_ray, is_verbose
from mmray.train.checkpoint import epoch_of, upload_checkpoint, uploads_in_background
from mmray.train.context import LoopInputs
from mmray.train.loop import train_loop

RAW_SUFFIX = "_decoded"  # datasets read from the shards when a partial embedding cache serves the first epochs


class RayWorkerContext:
    """:class:`~mmray.train.context.WorkerContext` for a Ray Train worker."""

    def __init__(self, config: JobConfig, run_dir: str, relay: Any, *, cached_epochs: int | None = None):
        """``cached_epochs``: a partial embedding cache serves those epochs; later ones read the ``*_decoded``
        datasets (:attr:`~mmray.train.context.LoopInputs.cached_epochs`)."""
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
        self._cached_epochs = cached_epochs
        self._uploading: threading.Event | None = None  # the checkpoint upload in the background, if any
        if relay is not None:  # every rank: the driver recognises Ray's notice of this process's death by its pid
            relay.push.remote({"type": "worker_started", "rank": self.rank, "pid": os.getpid()})

    def _batches(self, split: str, train: bool, epoch: int):
        import ray.train

        from mmray.data.pipeline import local_shuffle_rows  # Ray Data: imported in the worker process

        bs, data = self._config.train.batch_size, self._config.data
        if self._cached_epochs is not None and epoch > self._cached_epochs:
            split = f"{split}{RAW_SUFFIX}"  # the embedding cache served the epochs before: decode from now on
        buffer = local_shuffle_rows(data, bs, train)
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=bs,
            prefetch_batches=data.prefetch_batches,
            local_shuffle_buffer_size=buffer,
            # per rank and epoch: the same seed gives the same mixing, each epoch and rank mixes differently
            local_shuffle_seed=hash((self._config.train.seed, self.rank, epoch)) % 2**31 if buffer else None,
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
        """Ray Train stores the checkpoint in the run folder. A large one
        (:func:`~mmray.train.checkpoint.uploads_in_background`) is moved out of ``checkpoint_dir`` into a folder of
        its own and uploaded by Ray Train's upload thread while the next epoch trains; Ray registers it once it
        is stored, waits for the last upload when the loop returns, and fails the worker (so the run, or a
        restart under ``train.max_failures``) when an upload fails. One upload at a time: a report waits for the
        one before, so at most two checkpoints are on local disk."""
        import ray.train

        if not checkpoint_dir or not uploads_in_background(checkpoint_dir, self._config.checkpoint.async_upload_mb):
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            name = os.path.basename(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            return
        import shutil
        import tempfile

        name = os.path.basename(checkpoint_dir)
        if self._uploading is not None:
            self._uploading.wait()  # the one before is stored, or failed (then the worker is already failing)
        own = os.path.join(tempfile.mkdtemp(prefix="mmray-upload-"), name)
        shutil.move(checkpoint_dir, own)  # the caller's scratch folder is deleted when report returns
        done = self._uploading = threading.Event()
        storage = ray.train.get_context().get_storage()
        target = store.join(self.run_dir, name)

        def persist(checkpoint, dir_name):  # on Ray Train's upload thread
            try:
                return upload_checkpoint(own, target, lambda: storage.persist_current_checkpoint(checkpoint, dir_name))
            finally:
                shutil.rmtree(os.path.dirname(own), ignore_errors=True)
                done.set()

        from ray.train import CheckpointUploadMode

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(own), checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=persist)

    def keep(self, checkpoint_dir: str) -> None:
        return None  # Ray Train stores and registers the checkpoint in report; a resume continues from the last one

    @contextlib.contextmanager
    def resume_checkpoint(self):
        import ray.train

        with local_checkpoint(ray.train.get_checkpoint()) as path:
            yield path

    def progress(self, event: dict[str, Any]) -> None:
        if self.rank == 0 and self._relay is not None:
            self._relay.push.remote(event)


@contextlib.contextmanager
def local_checkpoint(checkpoint):
    """A Ray ``Checkpoint`` (Train's or Tune's; None passes through) as a local folder for the ``with`` block.

    A checkpoint on local storage is used where it is; one elsewhere is downloaded into a temporary folder
    that is deleted at the end, also on failure (Ray's ``to_directory()`` leaves a ``checkpoint_tmp_*`` copy
    of the whole checkpoint in the system temp folder on every resume, never deleted)."""
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    if checkpoint is None:
        yield None
        return
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem) and os.path.isdir(checkpoint.path):
        yield checkpoint.path
        return
    tmp = tempfile.mkdtemp(prefix="mmray-resume-")
    try:
        yield checkpoint.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _silence_report_log() -> None:
    """Ray Train logs every report (the whole metrics dict, per rank) at INFO under a logger named by its
    file path, outside ``ray.train``'s level control; mmray prints its own epoch line instead."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# Ray's words for why a worker process ended, in a person's words.
EXIT_CAUSES = {"SYSTEM_ERROR": "killed, out of memory or crashed", "NODE_DIED": "its node was lost",
               "USER_ERROR": "its process failed", "INTENDED_USER_EXIT": "stopped"}


def _worker_death(error: BaseException) -> str | None:
    """``"died (killed, out of memory or crashed)"`` when ``error`` says a worker's process is gone; None for an
    exception the training code raised."""
    import re

    from ray.exceptions import RayActorError

    text = str(error)
    gone = isinstance(error, RayActorError) or isinstance(getattr(error, "failure", None), RayActorError) \
        or "actor died" in text.lower()
    if not gone:
        return None
    kind = re.search(r"Worker exit type: (\w+)", text)
    pid = re.search(r"\bpid: (\d+)", text)
    cause = EXIT_CAUSES.get(kind.group(1), kind.group(1)) if kind else "its process ended"
    return f"died ({cause}{f'; pid {pid.group(1)}' if pid else ''})"


class _ConsoleQuiet:
    """On Ray Train's controller: its "Graceful shutdown of backend failed" warning, which carries a 20-line
    ``ActorDiedError`` traceback whenever a worker died, goes to Ray Train's log files only (the session's
    ``logs/train/``); mmray prints one line about the death instead (:class:`WorkerFailureLine`)."""

    LOGGER = "ray.train.v2._internal.callbacks.backend_setup"

    def filter(self, record) -> bool:
        import logging

        from ray.exceptions import RayActorError
        from ray.train.v2._internal.logging.logging import SessionFileHandler

        if not (record.exc_info and isinstance(record.exc_info[1], RayActorError)):
            return True
        for handler in logging.getLogger("ray.train").handlers:
            if isinstance(handler, SessionFileHandler):
                handler.handle(record)
        return False

    @classmethod
    def install(cls) -> None:
        import logging

        logger = logging.getLogger(cls.LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def _worker_failure_callback(relay: Any, max_failures: int, *, quiet: bool = True):
    """A Ray Train ``UserCallback`` (it runs on the controller) that sends one line per worker-group failure to
    the driver through ``relay``: ``worker 1 died (killed, out of memory or crashed; pid 4242); restarting from
    epoch 1's checkpoint, failure 1 of 1``. With ``quiet`` (not ``--verbose``), Ray's traceback of the death
    goes to Ray Train's log files only (:class:`_ConsoleQuiet`)."""
    from ray.train import UserCallback

    class WorkerFailureLine(UserCallback):
        def __init__(self):
            self.relay, self.max_failures, self.quiet = relay, max_failures, quiet
            self.failures, self.epoch = 0, 0

        def __setstate__(self, state):  # unpickled on the controller: quiet its console there
            self.__dict__.update(state)
            if self.quiet:
                _ConsoleQuiet.install()

        def after_report(self, run_context, metrics, checkpoint) -> None:
            epoch = epoch_of(checkpoint.path) if checkpoint is not None else None
            if epoch is not None:
                self.epoch = epoch

        def after_exception(self, run_context, worker_exceptions) -> None:
            self.failures += 1
            what = "; ".join(f"worker {rank} " + (_worker_death(e) or f"raised {type(e).__name__}")
                             for rank, e in sorted(worker_exceptions.items()))
            limit = "unlimited" if self.max_failures < 0 else str(self.max_failures)
            if self.max_failures >= 0 and self.failures > self.max_failures:
                then = f"no restarts left (train.max_failures {self.max_failures})"
            else:
                start = f"epoch {self.epoch}'s checkpoint" if self.epoch else "the start"
                then = f"restarting from {start}, failure {self.failures} of {limit}"
            from ray.train.v2._internal.logging.logging import LoggingManager

            logs = LoggingManager.get_log_directory()
            self.relay.push.remote({"type": "worker_failed", "line": f"{what}; {then}",
                                    "log_dir": logs})

    return WorkerFailureLine()


@contextlib.contextmanager
def _quiet_worker_deaths(pids: set[int] | None):
    """While the run trains, Ray's own notice that one of its Train workers (``pids``) died ("A worker died
    or was killed while executing a task by an unexpected system error ...", printed by the driver) is
    left to the raylet's log file: the controller's :class:`WorkerFailureLine` says it in one line."""
    if pids is None:
        yield
        return
    import re

    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream

    def about_our_worker(line: str) -> bool:
        found = re.search(r"Worker PID: (\d+)", line)
        return "A worker died or was killed" in line and found is not None and int(found.group(1)) in pids

    def filtered(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not about_our_worker(line)]
            if not lines:
                return None
            data = dict(data, lines=lines)
        return original(data, *args, **kwargs)

    ray_worker.print_to_stdstream = filtered
    try:
        yield
    finally:
        if ray_worker.print_to_stdstream is filtered:
            ray_worker.print_to_stdstream = original


def _train_worker(loop_config: dict[str, Any]) -> None:
    config = JobConfig.model_validate(loop_config["config"])
    inputs: LoopInputs = loop_config["inputs"]  # planned once by fit(), the same on every worker
    ctx = RayWorkerContext(config, loop_config["run_dir"], loop_config["relay"], cached_epochs=inputs.cached_epochs)
    train_loop(config, ctx, inputs)


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
        callbacks: list | None = None, cache=None, decoded=None, announce: bool = True) -> FitOutcome:
    """Run the job on Ray Train; returns where the best checkpoint is (by ``train.metric``).

    ``callbacks`` are Ray Train ``UserCallback``s (a sweep passes Tune's report callback). ``cache`` is the
    :class:`~mmray.data.cache.CachePlan` to train from, ``decoded`` the :class:`~mmray.data.decoded.DecodePlan`
    whose cached inputs replace decoding; None looks each up (never builds: runs and sweeps build first).
    ``announce``: say each plan in the run's log (a sweep's trial does not: the sweep said it once).
    """
    ensure_ray()
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmray.data.pipeline import build_dataset  # imports Ray Data: only once a run starts

    info = read_dataset_info(config.data.path)
    # the run's plans (looked up when not given), each announced in the run's log
    if cache is None:
        cache = plan(config, info, build=False)
    inputs = decoded if decoded is not None else decode_plan(config, info, build=False, embedding=cache)
    if announce:
        _announce("embedding_cache", cache.line(), on_event)
        _announce("decode_cache", inputs.line(), on_event)

    def input_datasets(suffix: str = "") -> dict:
        def split(name: str, train: bool):
            if inputs.used:
                return build_decoded_dataset(config.data, info, inputs.entry, name, train=train, seed=config.train.seed)
            return build_dataset(config.data, info, name, train=train, seed=config.train.seed)
        return {f"train{suffix}": split("train", True), f"val{suffix}": split("val", False)}

    if cache.used:
        datasets = {
            "train": build_cached_dataset(cache.entries, "train", train=True, seed=config.train.seed,
                                          shuffle=config.data.shuffle),
            "val": build_cached_dataset(cache.entries, "val", train=False),
        }
        if cache.partial:  # the encoders unfreeze after cache.epochs: those epochs decode the dataset
            datasets |= input_datasets(RAW_SUFFIX)
    else:
        datasets = input_datasets()
    relay = _progress_relay() if on_event else None
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    run_dir = store.normalize(run_dir)
    storage, name = store.split(run_dir)  # a local folder or a URI: Ray Train writes to either
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_dir": run_dir, "relay": relay,
                           "inputs": LoopInputs.from_cache(cache)},
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
            callbacks=[*(callbacks or []),
                       *([_worker_failure_callback(relay, config.train.max_failures, quiet=not is_verbose())]
                         if relay is not None else [])],
        ),
        datasets=datasets,
    )
    stop = threading.Event()
    poller = None
    worker_pids: set[int] = set()
    if relay is not None:
        def deliver(event: dict[str, Any]) -> None:
            if event["type"] == "worker_started":
                worker_pids.add(int(event["pid"]))
            else:
                on_event(event)

        def poll() -> None:
            while not stop.wait(0.5):
                for event in ray.get(relay.drain.remote()):
                    deliver(event)
            for event in ray.get(relay.drain.remote()):
                deliver(event)
        poller = threading.Thread(target=poll, name="mmray-progress", daemon=True)
        poller.start()
    try:
        with _quiet_worker_deaths(worker_pids if relay is not None and not is_verbose() else None):
            result = trainer.fit()
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=5)
    best = result.get_best_checkpoint(metric=config.train.metric, mode=config.train.mode) if result.metrics else None
    # Ray's checkpoint path is inside its filesystem (no scheme): name it under run_dir instead
    best_path = store.join(run_dir, os.path.basename(best.path.rstrip("/"))) if best else None
    return FitOutcome(run_dir, best_path, result.error)


def _announce(kind: str, line: str, on_event) -> None:
    """A plan's one log line: to ``on_event`` (``{"type": kind, "line": ...}``) when given, else printed."""
    if on_event is not None:
        on_event({"type": kind, "line": line})
    else:
        print(f"mmray {line}", flush=True)


def worker_error(error: BaseException | None, kind) -> BaseException | None:
    """The ``kind`` exception (a class or a tuple of them) a worker raised, found inside Ray Train's wrappers of ``error``
    (``WorkerGroupError.worker_failures``, their ``UserExceptionWithTraceback``, ``__cause__`` chains);
    None when there is none."""
    return find_error(error, kind)

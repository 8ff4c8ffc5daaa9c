"""``mmray.train``'s public entry: validate inputs, pick the run folder, fit on Ray, export the best epoch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from mmray import storage as store
from mmray.config import JobConfig
from mmray.config.errors import RunError, UserError
from mmray.config.schema import check_run_name
from mmray.data.cache import plan
from mmray.data.dataset_dir import DatasetInfo, check_shards, read_dataset_info
from mmray.data.decoded import plan as decode_plan
from mmray.data.tokenizer import TextTokenizer
from mmray.export.writer import EXPORT_METRICS_FILE, read_metrics
from mmray.hf_local import looks_local
from mmray.train.checkpoint import is_sharded_checkpoint, kept_checkpoints, read_state, strategy_mismatch
from mmray.train.finalize import export_checkpoint, supervised_best
from mmray.train.outputs import export_dir as run_export_dir
from mmray.train.outputs import resolve_run_dir, tensorboard_dir
from mmray.train.trainer import fit, worker_error


@dataclass
class RunResult:
    """What a finished ``mmray train`` produced.

    Attributes:
        run_dir: ``STORAGE/NAME``: Ray's checkpoints, ``tensorboard/`` and ``export/``.
        export_dir: the model export of the best epoch.
        metrics: the export's metrics (``epoch``, ``val.*``, ``test.*``).
        resumed: whether an interrupted run of the same name was continued.
        already_finished: the named run had finished before; nothing was trained.
    """

    run_dir: str
    export_dir: str
    metrics: dict[str, Any]
    resumed: bool
    already_finished: bool = False

    @property
    def tensorboard_command(self) -> str:
        return f"tensorboard --logdir {self.run_dir}"


def absolute_paths(config: JobConfig) -> JobConfig:
    """Relative local paths are relative to where the user ran mmray; Ray workers run elsewhere."""
    tokenizer = config.data.text.tokenizer
    text = config.data.text
    if tokenizer is not None and looks_local(tokenizer):
        text = text.model_copy(update={"tokenizer": os.path.abspath(os.path.expanduser(tokenizer))})
    data = config.data.model_copy(update={"path": store.normalize(config.data.path), "text": text})
    encoders = config.model.encoders.model_copy(update={
        m: getattr(config.model.encoders, m).absolute_paths() for m in type(config.model.encoders).model_fields})
    model = config.model.model_copy(update={"encoders": encoders})
    return config.model_copy(update={"data": data, "model": model, "storage": store.normalize(config.storage)})


def check_dataset(config: JobConfig) -> DatasetInfo:
    """The dataset exists and has what the job asks for. Raises :class:`UserError` before anything starts."""
    info = read_dataset_info(config.data.path)
    missing = [m for m in config.data.modalities if m not in info.modalities]
    if missing:
        raise UserError(
            f"data.modalities: {missing} not in dataset {config.data.path} (it has {list(info.modalities)}); "
            f"set data.modalities to a subset of those"
        )
    check_shards(info, config.data.modalities)  # footers only: missing, damaged or mismatched shards, empty splits
    return info


def check_model_files(config: JobConfig) -> None:
    """Every local file and Hugging Face model or tokenizer the job reads is there (from local files only,
    never the network). Raises :class:`UserError` naming the dotted key before anything starts."""
    for modality in config.data.modalities:
        getattr(config.model.encoders, modality).check_files(f"model.encoders.{modality}")
    if "text" in config.data.modalities and config.data.text.tokenizer is not None:
        TextTokenizer.from_pretrained(config.data.text.tokenizer)


def check_resume_point(run_dir: str, config: JobConfig | None = None) -> None:
    """The checkpoint a resume continues from (the latest kept) holds a plain training state, written under
    ``config``'s ``scaling.strategy`` (sharded for fsdp, whole for ddp); checked here, before Ray starts, so
    a planted or damaged ``state.pt`` or a changed strategy is exit 2 naming the file, not a worker failure.

    Raises:
        UserError: from :func:`mmray.train.checkpoint.read_state`, or the strategy changed.
    """
    kept = kept_checkpoints(run_dir)
    if kept:
        latest = kept[max(kept)]
        read_state(latest)
        sharded = is_sharded_checkpoint(latest)
        if config is not None and sharded != (config.scaling.strategy == "fsdp"):
            raise UserError(strategy_mismatch(latest, sharded))


def finished_run(run_dir: str) -> RunResult:
    """The result of a run that already finished, read back from its export's ``metrics.json``."""
    export_dir = run_export_dir(run_dir)
    try:
        metrics = read_metrics(export_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--name: run {run_dir} has an export folder without a readable {EXPORT_METRICS_FILE} ({e}); "
                        f"choose another name") from None
    return RunResult(run_dir, export_dir, metrics, resumed=False, already_finished=True)


def train(
    config: JobConfig,
    *,
    name: str | None = None,
    storage: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``config`` on Ray (a local cluster unless ``RAY_ADDRESS`` is set) and export the best epoch.

    Raises:
        UserError: bad dataset, storage that cannot be written or is nearly full, or a run folder another
            process is using (nothing started).
        RunError: a run-time failure mmray names itself (a bad record under ``on_bad_record: fail``), raised
            as the worker raised it, not wrapped by Ray.
        RuntimeError: training failed; the run folder keeps its checkpoints for a resume.
    """
    if name is not None:
        check_run_name(name, "--name")
    config = absolute_paths(config)
    info = check_dataset(config)
    check_model_files(config)
    root = store.normalize(storage or config.storage)
    store.check_writable(root, what="--storage" if storage else "storage")  # before Ray starts, not after an epoch
    run_dir, state = resolve_run_dir(root, name or config.name, explicit_name=name is not None)
    if state == "finished":
        return finished_run(run_dir)
    # One process per run folder: a second `mmray train --name X` is refused, naming the holder (exit 2).
    with store.folder_lock(run_dir, what="run"):
        if state == "resume":
            check_resume_point(run_dir, config)
        return _train_locked(config, info, run_dir, state, on_event)


def _train_locked(config: JobConfig, info: DatasetInfo, run_dir: str, state: str, on_event) -> RunResult:
    # Built once per dataset and key (a lock makes concurrent runs wait for one build); refused with a
    # reason when an encoder trains or augmentation changes a frozen encoder's inputs.
    cache = plan(config, info, build=True)
    # Likewise each row's decoded inputs (data.decode_cache), unless the embedding cache leaves nothing to decode.
    decoded = decode_plan(config, info, build=True, embedding=cache)
    outcome = fit(config, run_dir=run_dir, on_event=on_event, cache=cache, decoded=decoded)
    if outcome.error is not None:
        # mmray's own errors: a bad record under on_bad_record: fail, a non-finite loss, a full disk (RunError)
        known = worker_error(outcome.error, (UserError, RunError))
        if known is not None:  # mmray's own message, not Ray's wrapping of it
            raise known from None
        raise RuntimeError(f"training failed: {outcome.error}") from outcome.error
    if outcome.best_checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint; see the logs under {run_dir}")
    export_dir = run_export_dir(run_dir)
    metrics = export_checkpoint(config, info, supervised_best(config, outcome.best_checkpoint), export_dir,
                                tensorboard_dir=tensorboard_dir(run_dir), cache=cache,
                                decoded=decoded, on_event=on_event)  # the run's plans, not second ones
    return RunResult(run_dir, export_dir, metrics, state == "resume")

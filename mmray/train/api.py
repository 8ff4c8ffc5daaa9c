"""``mmray.train``'s public entry: validate inputs, pick the run folder, fit on Ray, export the best epoch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from mmray.config import JobConfig
from mmray.config.errors import UserError
from mmray.data.dataset_dir import DatasetInfo, read_dataset_info

EXPORT_DIR = "export"


@dataclass
class RunResult:
    """What a finished ``mmray train`` produced.

    Attributes:
        run_dir: ``STORAGE/NAME``: Ray's checkpoints, ``tensorboard/`` and ``export/``.
        export_dir: the model export of the best epoch.
        metrics: the export's metrics (``epoch``, ``val.*``, ``test.*``).
        resumed: whether an interrupted run of the same name was continued.
    """

    run_dir: str
    export_dir: str
    metrics: dict[str, Any]
    resumed: bool

    @property
    def tensorboard_command(self) -> str:
        return f"tensorboard --logdir {self.run_dir}"


def absolute_paths(config: JobConfig) -> JobConfig:
    """Relative local paths are relative to where the user ran mmray; Ray workers run elsewhere."""
    def fix(path: str) -> str:
        return path if "://" in path else os.path.abspath(path)

    from mmray.models.encoders.base import looks_local

    tokenizer = config.data.text.tokenizer
    text = config.data.text
    if tokenizer is not None and looks_local(tokenizer):
        text = text.model_copy(update={"tokenizer": os.path.abspath(os.path.expanduser(tokenizer))})
    data = config.data.model_copy(update={"path": fix(config.data.path), "text": text})
    encoders = config.model.encoders.model_copy(update={
        m: getattr(config.model.encoders, m).absolute_paths() for m in type(config.model.encoders).model_fields})
    model = config.model.model_copy(update={"encoders": encoders})
    return config.model_copy(update={"data": data, "model": model, "storage": fix(config.storage)})


def check_dataset(config: JobConfig) -> DatasetInfo:
    """The dataset exists and has what the job asks for. Raises :class:`UserError` before anything starts."""
    info = read_dataset_info(config.data.path)
    missing = [m for m in config.data.modalities if m not in info.modalities]
    if missing:
        raise UserError(
            f"data.modalities: {missing} not in dataset {config.data.path} (it has {list(info.modalities)}); "
            f"set data.modalities to a subset of those"
        )
    for split in ("train", "val"):
        if info.split_rows(split) == 0:
            raise UserError(f"data.path: {config.data.path} has no rows in split {split!r}")
    return info


def resolve_run_dir(storage: str, name: str, *, explicit_name: bool) -> tuple[str, bool]:
    """``(run_dir, resumed)``. An unfinished run of the same name is resumed from its checkpoints.

    A finished run is never overwritten: with a name given explicitly that is an error, otherwise
    the next free ``NAME-2``, ``NAME-3``... is used.
    """
    storage = os.path.abspath(storage)
    candidate, n = name, 1
    while True:
        run_dir = os.path.join(storage, candidate)
        if not os.path.exists(run_dir):
            return run_dir, False
        if not os.path.isdir(os.path.join(run_dir, EXPORT_DIR)):
            return run_dir, any(d.startswith("checkpoint_") for d in os.listdir(run_dir))
        if explicit_name:
            raise UserError(f"--name {name}: run {run_dir} already finished; choose another name")
        n += 1
        candidate = f"{name}-{n}"


def train(
    config: JobConfig,
    *,
    name: str | None = None,
    storage: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``config`` on Ray (a local cluster unless ``RAY_ADDRESS`` is set) and export the best epoch.

    Raises:
        UserError: bad dataset or run name (nothing started).
        RuntimeError: training failed; the run folder keeps its checkpoints for a resume.
    """
    config = absolute_paths(config)
    info = check_dataset(config)
    run_dir, resumed = resolve_run_dir(storage or config.storage, name or config.name, explicit_name=name is not None)
    from mmray.train.finalize import export_checkpoint
    from mmray.train.trainer import fit

    from mmray.data.cache import plan

    # Built once per dataset and key (a lock makes concurrent runs wait for one build); refused with a
    # reason when an encoder trains or augmentation changes a frozen encoder's inputs.
    cache = plan(config, info, build=True)
    outcome = fit(config, run_dir=run_dir, on_event=on_event, cache=cache)
    if outcome.error is not None:
        raise RuntimeError(f"training failed: {outcome.error}") from outcome.error
    if outcome.best_checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint; see the logs under {run_dir}")
    export_dir = os.path.join(run_dir, EXPORT_DIR)
    metrics = export_checkpoint(config, info, outcome.best_checkpoint, export_dir)
    return RunResult(run_dir, export_dir, metrics, resumed)

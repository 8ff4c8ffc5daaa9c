"""mmray: train multimodal (image + text + audio) fusion models on Ray, and sweep them.

Public names resolve lazily, so ``import mmray`` stays light and never starts or imports Ray:

- :func:`load_model` (``mmray.export``): an export folder -> a predictor; no Ray needed.
- :func:`evaluate` (``mmray.export``): an export's metrics on a dataset split; no Ray needed.
- :func:`load_job` / :class:`JobConfig` (``mmray.config``): read and validate a job YAML.
- :func:`fit` (``mmray.train.api.train``): train a job on Ray and export the best epoch (``mmray train``).
- :func:`tune_job` (``mmray.tune.api``): sweep a job over a search space (``mmray tune``).

The subpackages (``mmray.config``, ``mmray.data``, ``mmray.models``, ``mmray.train``, ``mmray.tune``,
``mmray.export``, ``mmray.jobs``, ``mmray.cli``) are always the subpackages: no exported name shares a
subpackage's name, so ``mmray.<name>`` is the same object on every access, whatever was imported before.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# exported name -> (module, attribute in it)
_EXPORTS = {
    "load_model": ("mmray.export.loader", "load_model"),
    "evaluate": ("mmray.export.evaluate", "evaluate"),
    "load_job": ("mmray.config.loader", "load_job"),
    "JobConfig": ("mmray.config.schema", "JobConfig"),
    "ConfigError": ("mmray.errors", "ConfigError"),
    "UserError": ("mmray.errors", "UserError"),
    "fit": ("mmray.train.api", "train"),
    "tune_job": ("mmray.tune.api", "tune_job"),
}
_SUBPACKAGES = ("cli", "config", "data", "export", "jobs", "models", "train", "tune")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # resolved once: later accesses skip this function
        return value
    if name in _SUBPACKAGES:  # `mmray.train` without `import mmray.train` first: the subpackage, as after it
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

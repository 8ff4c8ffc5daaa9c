"""mmray: train multimodal (image + text + audio) fusion models on Ray, and sweep them.

Public names resolve lazily, so ``import mmray`` stays light and never starts or imports Ray:

- :func:`load_model` (``mmray.export``): an export folder -> a predictor; no Ray needed.
- :func:`load_job` / :class:`JobConfig` (``mmray.config``): read and validate a job YAML.
- :func:`train` (``mmray.train.api``): train a job on Ray and export the best epoch.
"""
from __future__ import annotations

from mmray._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "mmray.export",
    "load_job": "mmray.config",
    "JobConfig": "mmray.config",
    "ConfigError": "mmray.config",
    "UserError": "mmray.config",
    "train": "mmray.train.api",
    "evaluate": "mmray.export.evaluate",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Typed job config: schema, YAML loading, ``--set`` overrides and validation errors.

Names are resolved lazily so that components can import :mod:`mmray.config.errors` while the
schema (which is assembled from the component registries) is still being built.
"""
from __future__ import annotations

from mmray._lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "mmray.config.errors",
    "RunError": "mmray.config.errors",
    "UserError": "mmray.config.errors",
    "JobConfig": "mmray.config.schema",
    "METRICS": "mmray.config.schema",
    "MODALITIES": "mmray.config.schema",
    "apply_overrides": "mmray.config.loader",
    "from_yaml_text": "mmray.config.loader",
    "load_job": "mmray.config.loader",
    "to_yaml": "mmray.config.loader",
    "validate_job": "mmray.config.loader",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

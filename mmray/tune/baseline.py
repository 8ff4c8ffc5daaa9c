"""The sweep's baseline trial (``baseline: true`` in the space): the job as is, recognised by its parameters.

A module of its own so that the space, the schedulers (which import Ray) and the results all ask it
without importing each other.
"""
from __future__ import annotations

from typing import Any


def is_baseline(params: dict[str, Any] | None, point: dict[str, Any]) -> bool:
    """Whether a trial's parameters are the baseline point (Optuna hands enqueued values back unchanged)."""
    params = params or {}
    return bool(point) and all(k in params and params[k] == v for k, v in point.items())

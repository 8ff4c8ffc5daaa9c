"""Training: the per-worker loop, metrics, checkpoints and the thin Ray Train wrapper.

Names resolve lazily, so ``import mmray.train`` stays light and never imports Ray. The public entry
(``mmray train``) is :func:`mmray.fit` (:func:`mmray.train.api.train`).
"""
from __future__ import annotations

from mmray._lazy import lazy_exports

_EXPORTS = {
    "RunResult": ".api",
    "TrainState": ".checkpoint",
    "LocalContext": ".context",
    "WorkerContext": ".context",
    "export_checkpoint": ".finalize",
    "train_local": ".local",
    "train_loop": ".loop",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

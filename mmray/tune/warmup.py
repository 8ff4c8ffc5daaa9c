"""Warm trial processes: the first trial of each slot starts in a process that imported torch and mmray while the
driver was still planning the sweep.

A trial that starts a process pays for a fresh Python importing torch, Ray Tune and mmray's loop, and for the first
``torch.optim.AdamW`` (it imports ``torch._dynamo`` lazily): ~3x a bare Tune trial to its first step
(``benchmarks/RESULTS.md``, "The cold trial"). Ray starts one idle worker process per CPU with a local cluster, and
can import modules in each worker it starts (``preload_python_modules``). Two things kept the trials from those:

- Ray Tune gives each trainable's actor a runtime environment of its own (``PL_DISABLE_FORK=1`` for PyTorch Lightning,
  plus any AWS credentials and Ray Train settings it copies from the driver's environment), and Ray hands an actor
  only an idle worker of the same runtime environment: every trial started one more process, beside the idle ones.
  mmray does not use Lightning; :func:`idle_workers_for_trials` drops that variable while the sweep's Tuners create
  their actors, so, when nothing else is copied, the trial actors get no runtime environment and take the idle workers.
- A worker that ran a task is never given to an actor (Ray keeps task and actor processes apart), so warming the idle
  workers with tasks cannot help; preloading in the worker itself does.

A trial that arrives before its worker finished importing waits in that worker (it is the same work, done once).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

# What the first step of an in-process trial imports: torch, the module the first AdamW imports, the trainable's
# module (Ray Tune, the loop, the trainer) and what the trial imports when it starts.
TRIAL_MODULES = ("torch", "torch._dynamo", "mmray.tune.sweep", "mmray.tune.cores", "mmray.tune.context",
                 "mmray.data.decoded")
LIGHTNING_ONLY = "PL_DISABLE_FORK"  # Tune's default env var for its trainable actors (PyTorch Lightning's fork guard)


def _tune_class_cache():
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return None
    if not isinstance(getattr(class_cache, "DEFAULT_ENV_VARS", None), dict) \
            or not hasattr(class_cache, "ENV_VARS_TO_PROPAGATE"):
        return None
    return class_cache


def trials_can_take_idle_workers() -> bool:
    """Whether Tune's trial actors would get no runtime environment without :data:`LIGHTNING_ONLY` (nothing else set
    in it by Tune, none of the variables Tune copies from the driver set here)."""
    cc = _tune_class_cache()
    if cc is None:
        return False
    others = {k for k in cc.DEFAULT_ENV_VARS if k != LIGHTNING_ONLY}
    return not others and not any(k in os.environ for k in cc.ENV_VARS_TO_PROPAGATE)


@contextlib.contextmanager
def idle_workers_for_trials() -> Iterator[bool]:
    """While inside: Tune creates trainable actors without :data:`LIGHTNING_ONLY`, so, when
    :func:`trials_can_take_idle_workers`, they take Ray's idle (preloaded) workers. Yields whether they do; Tune's
    default is put back on the way out."""
    cc = _tune_class_cache()
    if cc is None or not trials_can_take_idle_workers():
        yield False
        return
    had = LIGHTNING_ONLY in cc.DEFAULT_ENV_VARS
    value = cc.DEFAULT_ENV_VARS.pop(LIGHTNING_ONLY, None)
    try:
        yield True
    finally:
        if had:
            cc.DEFAULT_ENV_VARS[LIGHTNING_ONLY] = value

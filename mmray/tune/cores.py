"""Every core busy to the end of a sweep: when fewer in-process trials remain than cores, they share the free ones.

Each in-process trial reserves one CPU from Ray and trains with one thread while more trials wait. Once no
trial waits (the searcher has handed out its last one), :class:`CoreBalancer`, a Tune callback in the
driver, splits the cluster's CPUs between the trials still running and publishes the shares in Ray's
key-value store (no actor: one would take one of the idle worker processes Ray starts for the first trials);
each trial reads its share at the start of every epoch and follows it with ``torch.set_num_threads``
(:class:`ShareFollower`), and reports it as ``cpu_share`` with its metrics.

Why not Ray Tune's ``ResourceChangingScheduler``: it resizes a trial by pausing it, stopping its process and
restoring it from its checkpoint in a new process, and it refuses ``reuse_actors``. mmray reuses each slot's
process so that torch and the decoders are imported once per slot, not once per trial
(``benchmarks/RESULTS.md``, "Sweeps"); a resize would pay that cold start again for every running trial.
Here a share changes between two epochs of the same process, at no cost. No other trial can be waiting when
shares grow, so no trial is starved of the CPU Ray reserved for it.

The sweep's mean busy-core fraction (the CPUs given to running trials, integrated over time, over CPUs x wall
time) is measured here and printed in the sweep's summary.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from ray.tune import Callback

from mmray.tune.experiment import write_cores

NAMESPACE = "mmray"  # Ray key-value store namespace of the shares


def publish_shares(key: str, shares: dict[str, int]) -> None:
    """Store ``{trial_id: cpus}`` under ``key`` for the trials to read (Ray's key-value store, in the GCS)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, json.dumps(shares), overwrite=True, namespace=NAMESPACE)


def read_share(key: str, trial_id: str) -> int | None:
    """This trial's CPUs as last published under ``key``; None when nothing is published for it."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(key, namespace=NAMESPACE)
    share = json.loads(raw).get(trial_id) if raw else None
    return int(share) if share is not None else None


def split_cores(cpus: int, running: list[str], waiting: int, reserved: int = 1) -> dict[str, int]:
    """Each running trial's CPUs: ``reserved`` while trials wait, else the CPUs split as evenly as whole threads
    allow (the trials started first get the remainder). Never below ``reserved``."""
    if not running:
        return {}
    if waiting > 0:
        return {t: reserved for t in running}
    each, extra = divmod(max(cpus, reserved * len(running)), len(running))
    return {t: max(reserved, each + (1 if i < extra else 0)) for i, t in enumerate(running)}


class CoreBalancer(Callback):
    """Driver-side: re-splits the cores whenever the set of running or waiting trials changes; measures the
    sweep's busy-core fraction. ``publish`` receives each new ``{trial_id: cpus}`` (default: :func:`publish_shares`
    under ``key``)."""

    def __init__(self, *, cpus: int, total_trials: int, key: str, experiment_dir: str | None = None,
                 clock=time.monotonic, publish=None):
        self.cpus, self.total_trials, self.key = cpus, total_trials, key
        self.experiment_dir = experiment_dir  # where cores.json goes when the sweep ends
        self.clock, self._publish = clock, publish
        self.shares: dict[str, int] = {}
        self.start: float | None = None
        self.end: float | None = None
        self._last: float | None = None
        self.busy_cpu_s = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_publish": None}  # Tune pickles its callbacks for --resume

    # Tune hooks ----------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.start = self._last = self.clock()

    def on_step_end(self, iteration, trials, **info) -> None:
        self._account()
        running = [t.trial_id for t in trials if t.status == "RUNNING"]
        waiting = max(0, self.total_trials - len(trials)) + sum(t.status in ("PENDING", "PAUSED") for t in trials)
        shares = split_cores(self.cpus, running, waiting)
        if shares != self.shares:
            self.shares = shares
            self.publish(shares)

    def on_experiment_end(self, trials, **info) -> None:
        self._account()
        self.shares = {}
        self.end = self.clock()
        if self.experiment_dir:

            write_cores(self.experiment_dir, self.figures())

    # measurement ------------------------------------------------------------------------
    def _account(self) -> None:
        now = self.clock()
        if self._last is not None:
            self.busy_cpu_s += (now - self._last) * sum(self.shares.values())
        self._last = now

    def busy_fraction(self) -> float | None:
        """Mean CPUs given to running trials over the CPUs there are, from the first step to the last."""
        wall = self._wall()
        return None if wall is None else (self.busy_cpu_s / (self.cpus * wall) if wall > 0 and self.cpus else None)

    def _wall(self) -> float | None:
        if self.start is None:
            return None
        return (self.clock() if self.end is None else self.end) - self.start

    def figures(self) -> dict[str, float | None]:
        return {"cpus": self.cpus, "wall_s": round(self._wall() or 0.0, 3), "busy_cpu_s": round(self.busy_cpu_s, 3),
                "busy_fraction": self.busy_fraction()}

    def publish(self, shares: dict[str, int]) -> None:
        (self._publish or (lambda s: publish_shares(self.key, s)))(shares)


class ShareFollower:
    """Trial-side: at each epoch, the trial's CPU share as the driver last published it, applied to torch."""

    def __init__(self, key: str | None, trial_id: str):
        self.key, self.trial_id = key, trial_id
        self.threads = 1

    def follow(self) -> int:
        import torch

        share = self.share()
        if share is not None:
            self.threads = max(1, min(share, os.cpu_count() or 1))  # a trial's threads run on its own node
        torch.set_num_threads(self.threads)
        return self.threads

    def share(self) -> int | None:
        if not self.key:
            return None
        try:
            return read_share(self.key, self.trial_id)
        except Exception:  # noqa: BLE001 - no share readable: keep training with the current one
            return None

"""Starting or joining Ray, quietly. Only the Ray layer (trainer, tune, jobs) imports this."""
from __future__ import annotations

import logging
import os
import warnings

# Inherited by the Ray processes a local driver starts; a job submitted to a cluster passes them in its
# runtime env instead (the cluster's processes were started by someone else).
QUIET_ENV = {
    "RAY_DEDUP_LOGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # "Starting execution of Dataset ..." per epoch
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def quiet_ray_logs() -> None:
    """Keep Ray's own chatter (progress bars, info logs, deprecation notices) out of the user's terminal."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")


def ensure_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray if neither is set.

    Returns the Ray context. Inside an already initialised driver this is a no-op.
    """
    quiet_ray_logs()
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
        kwargs = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": never join a cluster some other `ray start` left running on this host
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
    DataContext.get_current().enable_progress_bars = False
    return ray

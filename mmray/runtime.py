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


# Lines Ray's own processes print that tell a user nothing they can act on; they stay in Ray's session log
# files (/tmp/ray/session_*/logs), only their copy on the user's terminal is dropped. Substrings of the line.
RAY_NOISE = (
    "Progress bars disabled. To enable",  # Ray Data, once per split coordinator: every epoch of `mmray train`
    "'PreemptionWatcher'",  # core_worker.cc error-level line from Ray Train's controller about its own actor
)
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"  # every local start; the default is safe


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TOKEN_NOTICE not in record.getMessage()


def quiet_ray_logs() -> None:
    """Keep Ray's own chatter (progress bars, info logs, deprecation notices) out of the user's terminal."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in auth.filters):
        auth.addFilter(_DropTokenNotice())


def _drop_ray_noise() -> None:
    """Filter the worker lines Ray copies to this driver's terminal (``log_to_driver``) through :data:`RAY_NOISE`.

    Ray has no public filter for them, so its printing handler is wrapped; if that private hook moves in a
    later Ray, nothing is filtered (and nothing breaks)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handler, "drops_ray_noise", False):
            continue

        def filtered(data, _print=handler):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)]
            if lines:
                _print({**data, "lines": lines})

        filtered.drops_ray_noise = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


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
        _drop_ray_noise()
    DataContext.get_current().enable_progress_bars = False
    return ray

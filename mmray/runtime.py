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
    "RAW: Lock blocking",  # abseil's mutex debug line from a Ray process under load
)
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"  # every local start; the default is safe


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TOKEN_NOTICE not in record.getMessage()


_verbose = False


def set_verbose(flag: bool) -> None:
    """``mmray --verbose``: Ray processes' tracebacks are printed too (Ray's log files always keep them)."""
    global _verbose
    _verbose = flag


def is_verbose() -> bool:
    """Whether ``mmray --verbose`` asked for Ray's own output unfiltered."""
    return _verbose


class TracebackFilter:
    """Wraps the driver's printer of Ray processes' output: drops Python tracebacks (tracked per process,
    as one may span several batches of lines), Ray's lines announcing the same failure and its
    :data:`RAY_NOISE`; keeps every other line. The CLI tells a failure once, naming its cause: the same traceback from each worker and
    data task would bury it. Ray's log files keep everything; ``--verbose`` prints it all."""

    CHAIN = ("Traceback (most recent call last)", "During handling of the above exception",
             "The above exception was the direct cause")
    # Ray Train's and Ray Data's own lines about a failure the traceback belongs to
    ANNOUNCEMENTS = ("Error in training function", "Failed to apply UDF transform", "To change retry attempts",
                     "An exception was raised from a task of operator", "get() failed after")

    def __init__(self, printer):
        self.printer = printer
        self._inside: dict[tuple, bool] = {}

    def __call__(self, data: dict) -> None:
        key = (data.get("ip"), data.get("pid"))
        inside, kept = self._inside.get(key, False), []
        for line in data.get("lines", []):
            if line.startswith(self.CHAIN) or (line[:1].isspace() and line.strip()):
                inside = True  # a traceback's header, a frame, its source line or caret marker
            elif not line.strip(" ^~"):
                pass  # a blank or caret line
            elif inside:
                inside = False  # the exception line ends the traceback
            elif not any(a in line for a in (*self.ANNOUNCEMENTS, *RAY_NOISE)):
                kept.append(line)
        self._inside[key] = inside
        if kept:
            self.printer({**data, "lines": kept})


def _hide_worker_tracebacks() -> None:
    try:  # Ray's driver-side printer of worker output has no public hook; without one, output is unfiltered
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, printer in list(dispatcher.handlers):
        if name == "ray_print_logs" and not isinstance(printer, TracebackFilter):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, TracebackFilter(printer))


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
            # "local": never join a cluster some other `ray start` left running on this host.
            # Ray starts its workers at nice 15 so that its own daemons stay responsive; on a local run the
            # workers *are* the user's job (trials, training, decoding), and at nice 15 any other busy process
            # on the machine (an editor's indexer, a second script) takes most of the CPU from them: measured
            # 4x slower epochs beside a few background jobs. They run at the caller's priority instead.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                     _system_config={"worker_niceness": 0}, **kwargs)
        if not _verbose:
            _hide_worker_tracebacks()
    DataContext.get_current().enable_progress_bars = False
    return ray

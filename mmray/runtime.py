"""Starting or joining Ray, quietly. Only the Ray layer (trainer, tune, jobs) imports this."""
from __future__ import annotations

import logging
import os
import warnings

from mmray.errors import RunError

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
    # Ray Data, once per process that runs a dataset (the driver building a cache, each split coordinator of
    # `mmray train`): it reports mmray's own choice of no progress bars.
    "Progress bars disabled. To enable",
    # core_worker.cc error-level line about Ray Train's preemption watcher (its constructor arguments are actor
    # handles): a local Ray runs no watcher (PREEMPTION_WATCHER_OFF), a cluster's Train runs still start one.
    "'PreemptionWatcher'",
    "RAW: Lock blocking",  # abseil's mutex debug line from a Ray process under load
    # gcs_server, when an actor pool ends while one of its actors is still being created (a loaded machine):
    # the kill finds the half-started worker gone. Nothing was lost; the pool's work was done.
    "Failed to kill actor",
    # raylet, when a new worker process takes over a minute to import its modules (a loaded machine): it is
    # still starting, and Ray waits for it.
    "have not registered within the timeout",
)
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"  # every local start; the default is safe


# A local Ray has one node, which no autoscaler drains: Ray Train's preemption watcher (an actor per run, with
# an error-level line about its constructor arguments) has nothing to watch there.
PREEMPTION_WATCHER_OFF = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TOKEN_NOTICE not in record.getMessage()


class _DropRayNoise(logging.Filter):
    """The driver's own copy of a :data:`RAY_NOISE` line (Ray Data logs it in whichever process runs a dataset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in RAY_NOISE)


# The driver-side loggers that print a RAY_NOISE line (a filter on a logger sees only its own records)
NOISY_LOGGERS = ("ray.data._internal.progress",)


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
             "The above exception was the direct cause",
             "Exception in thread ")  # threading's header above a thread's traceback
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
    if not _verbose:
        for name in NOISY_LOGGERS:
            noisy = logging.getLogger(name)
            if not any(isinstance(f, _DropRayNoise) for f in noisy.filters):
                noisy.addFilter(_DropRayNoise())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray gives a starting node 30 s to register with its GCS (hard-coded in ray/_private/node.py); a machine whose
# cores are saturated by other work can miss that once, and a second start (warm page cache) usually makes it.
START_ATTEMPTS = 3
NODE_START_TIMEOUT = "timed out during startup"


def _start_local_ray(ray, num_cpus: int | None, **kwargs) -> None:
    """Start a local Ray (:func:`_init_local_ray`), again when its node timed out during start-up on a busy
    machine (up to :data:`START_ATTEMPTS` times); then a :class:`~mmray.errors.RunError` that says so, with the
    load. Between attempts ``ray.shutdown()`` drops what the driver had connected; the processes of a node that
    never registered are ended by Ray's reaper when this process exits."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            _init_local_ray(ray, num_cpus, **kwargs)
            return
        except Exception as e:
            if NODE_START_TIMEOUT not in str(e):
                raise
            ray.shutdown()
            load = os.getloadavg()[0]
            if attempt == START_ATTEMPTS:
                raise RunError(f"the local Ray did not start: its node missed Ray's 30 s start-up deadline "
                               f"{START_ATTEMPTS} times (load average {load:.1f} on {os.cpu_count()} cores); "
                               f"run again when the machine is less busy") from e
            logging.getLogger(__name__).warning(
                "mmray: warning: the local Ray's node did not start within Ray's 30 s (load average %.1f on %d "
                "cores); starting it again (%d/%d)", load, os.cpu_count(), attempt + 1, START_ATTEMPTS)


def _init_local_ray(ray, num_cpus: int | None, **kwargs) -> None:
    """Start a local Ray whose processes know their own cluster's state API.

    Ray Train's placement-group cleaner (a detached actor per run) asks the state API about the run's controller
    without an address, so Ray looks for *the* Ray on the host: with a second one running (another `mmray train`,
    a `ray start`), it raises "Found multiple active Ray instances" in the cleaner's monitor thread, whose
    traceback reached the user at the end of every such run, and the cleaner watched nothing. The dashboard (which
    serves the state API) gets a port chosen here, and every Ray process inherits ``RAY_API_SERVER_ADDRESS``
    naming it; the driver's own ``RAY_API_SERVER_ADDRESS`` is put back as it was.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    key = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(key)
    os.environ[key] = url  # read by the processes ray.init starts (GCS, raylet, and so every worker)
    for name, value in PREEMPTION_WATCHER_OFF.items():
        os.environ.setdefault(name, value)  # read by Ray Train in this driver, and passed on to its controller
    try:
        # Ray starts its workers at nice 15 so that its own daemons stay responsive; on a local run the
        # workers *are* the user's job (trials, training, decoding), and at nice 15 any other busy process
        # on the machine (an editor's indexer, a second script) takes most of the CPU from them: measured
        # 4x slower epochs beside a few background jobs. They run at the caller's priority instead.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
                 dashboard_port=port, _system_config={"worker_niceness": 0}, **kwargs)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


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
            _start_local_ray(ray, num_cpus, **kwargs)
        if not _verbose:
            _hide_worker_tracebacks()
    DataContext.get_current().enable_progress_bars = False
    return ray

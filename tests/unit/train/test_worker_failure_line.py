"""A Train worker that dies is one line for the user; Ray's traceback goes to its log files only.
(The real kill is in tests/integration/test_worker_death.py.)"""
from __future__ import annotations

import logging
import sys

import pytest

ray = pytest.importorskip("ray")

from mmray.train import trainer  # noqa: E402


class _Relay:
    def __init__(self):
        self.events = []
        self.push = self

    def remote(self, event):
        self.events.append(event)


class _Checkpoint:
    def __init__(self, path):
        self.path = path


def _died(pid: int):
    from ray.exceptions import ActorDiedError

    err = ActorDiedError()
    err.error_msg = (f"The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\t"
                     f"pid: {pid}\nThe actor is dead because its worker process has died. Worker exit type: "
                     "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits")
    return err


def test_a_dead_worker_is_one_line_naming_rank_cause_epoch_and_failures():
    relay = _Relay()
    callback = trainer._worker_failure_callback(relay, max_failures=1)
    callback.after_report(None, [{}], _Checkpoint("/runs/x/checkpoint_epoch_0001"))
    callback.after_exception(None, {1: _died(4242)})
    line = relay.events[-1]["line"]
    assert line == ("worker 1 died (killed, out of memory or crashed; pid 4242); restarting from epoch 1's "
                    "checkpoint, failure 1 of 1")
    callback.after_exception(None, {0: ValueError("boom")})
    assert relay.events[-1]["line"] == "worker 0 raised ValueError; no restarts left (train.max_failures 1)"


def test_ray_trains_death_traceback_goes_to_its_log_files_not_the_console(tmp_path):
    from ray.train.v2._internal.logging.logging import SessionFileHandler

    class _File(SessionFileHandler):  # a session file handler that needs no Ray session
        def __init__(self):
            logging.Handler.__init__(self)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    train_logger, console, file = logging.getLogger("ray.train"), logging.StreamHandler(sys.stderr), _File()
    seen_on_console = []
    console.emit = seen_on_console.append
    saved = train_logger.handlers[:], train_logger.propagate
    train_logger.handlers[:] = [file, console]
    try:
        trainer._ConsoleQuiet.install()
        log = logging.getLogger(trainer._ConsoleQuiet.LOGGER)
        try:
            raise _died(7)
        except Exception:
            log.warning("Graceful shutdown of backend failed.", exc_info=True)
        log.warning("something else")
    finally:
        train_logger.handlers[:], train_logger.propagate = saved
    assert [r.getMessage() for r in seen_on_console] == ["something else"]
    assert [r.getMessage() for r in file.records] == ["Graceful shutdown of backend failed.", "something else"]
    assert file.records[0].exc_info is not None  # the whole traceback stays in the file


def test_rays_notice_of_a_train_workers_death_is_not_printed_by_the_driver(monkeypatch):
    import ray._private.worker as ray_worker

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    notice = "A worker died or was killed while executing a task by an unexpected system error. Worker PID: {}"
    with trainer._quiet_worker_deaths({4242}):
        ray_worker.print_to_stdstream({"pid": "raylet", "lines": [notice.format(4242)]}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"pid": "raylet", "lines": [notice.format(99)]}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"pid": 5, "lines": ["hello"]}, ignore_prefix=False)
    assert printed == [[notice.format(99)], ["hello"]]
    ray_worker.print_to_stdstream({"pid": "raylet", "lines": [notice.format(4242)]}, ignore_prefix=False)
    assert printed[-1] == [notice.format(4242)]  # after the run: Ray's own behaviour again


def test_the_callback_travels_to_the_controller():
    import ray.cloudpickle

    callback = trainer._worker_failure_callback(_Relay(), max_failures=2)
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(callback))
    assert copy.max_failures == 2
    assert any(isinstance(f, trainer._ConsoleQuiet)
               for f in logging.getLogger(trainer._ConsoleQuiet.LOGGER).filters)

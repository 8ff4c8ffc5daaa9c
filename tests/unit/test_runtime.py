"""What mmray keeps of Ray's own output on the user's terminal (no Ray started)."""
from __future__ import annotations

import logging

import pytest

from mmray import runtime
from mmray.errors import RunError


def test_ray_noise_from_workers_is_dropped_and_everything_else_printed():
    printed = []
    f = runtime.TracebackFilter(printed.append)
    f({"pid": 1, "is_err": False, "lines": [
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
        "mmray epoch=1/3 train.loss=1.8"]})
    f({"pid": 2, "is_err": True, "lines": [
        "[2026-11-30 18:13:17,756 E 15493 15597] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: '44' has constructor arguments in the object store and max_restarts > 0."]})
    assert printed == [{"pid": 1, "is_err": False, "lines": ["mmray epoch=1/3 train.loss=1.8"]}]


def test_the_token_notice_is_not_logged(caplog, monkeypatch):
    for key in runtime.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)  # quiet_ray_logs sets them; put back as they were after the test
    runtime.quiet_ray_logs()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster.")
    assert [r.getMessage() for r in caplog.records] == ["Token authentication is disabled for this Ray cluster."]


def test_a_ray_threads_traceback_is_dropped_whole():
    # Printed by a Ray actor's thread that died (Ray Train's placement-group cleaner): threading's header line,
    # the traceback and the exception line are one block; the next line is kept.
    printed = []
    f = runtime.TracebackFilter(printed.append)
    f({"pid": 7, "is_err": True, "lines": [
        "Exception in thread PlacementGroupCleanerMonitor:",
        "Traceback (most recent call last):",
        '  File "/x/threading.py", line 1045, in _bootstrap_inner',
        "    self.run()",
        "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:35957', '192.0.2.2:38771'}.",
        "mmray epoch=2/2 train.loss=1.1"]})
    assert printed == [{"pid": 7, "is_err": True, "lines": ["mmray epoch=2/2 train.loss=1.1"]}]


def test_rays_lines_about_a_loaded_machine_are_dropped():
    printed = []
    runtime.TracebackFilter(printed.append)({"pid": "gcs_server", "is_err": True, "lines": [
        "[2026-11-30 22:07:09,204 E 18025 18025] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
        "efe5, return status: Invalid: KillActor RPC failed for actor efe5: RpcError: RPC error: Socket closed"]})
    runtime.TracebackFilter(printed.append)({"pid": "raylet", "is_err": True, "lines": [
        "[2026-11-30 22:35:13,898 E 22353 22353] (raylet) worker_pool.cc:660: Some workers of the worker "
        "process(5366) have not registered within the timeout. The process is still alive, probably it's hanging "
        "during start."]})
    assert printed == []


def test_the_drivers_progress_bar_notice_is_not_logged_unless_verbose(caplog, monkeypatch):
    for key in runtime.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    logger = logging.getLogger("ray.data._internal.progress")
    monkeypatch.setattr(logger, "filters", [])
    notice = "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`."
    runtime.set_verbose(True)
    try:
        runtime.quiet_ray_logs()  # --verbose: Ray's lines stay
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning(notice)
        assert [r.getMessage() for r in caplog.records] == [notice]
    finally:
        runtime.set_verbose(False)
    caplog.clear()
    runtime.quiet_ray_logs()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(notice)
        logger.warning("Progress bars for operators disabled.")
    assert [r.getMessage() for r in caplog.records] == ["Progress bars for operators disabled."]


class SlowNodeRay:
    """Stands for the ``ray`` module on a machine so busy that the local node misses Ray's start-up deadline
    ``misses`` times (the exception and message are Ray's own, from ray/_private/node.py)."""

    def __init__(self, misses: int):
        self.misses, self.inits, self.shutdowns = misses, 0, 0

    def init(self, **kwargs):
        self.inits += 1
        if self.inits <= self.misses:
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")

    def shutdown(self):
        self.shutdowns += 1


def test_a_local_ray_whose_node_missed_its_start_up_deadline_is_started_again(caplog):
    fake = SlowNodeRay(misses=2)
    with caplog.at_level(logging.WARNING, logger="mmray.runtime"):
        runtime._start_local_ray(fake, 2)
    assert (fake.inits, fake.shutdowns) == (3, 2)
    assert [r.getMessage().split(" (load")[0] for r in caplog.records] == [
        "mmray: warning: the local Ray's node did not start within Ray's 30 s"] * 2


def test_a_local_ray_that_never_starts_says_why_in_one_line():
    fake = SlowNodeRay(misses=99)
    with pytest.raises(RunError, match=r"the local Ray did not start: its node missed Ray's 30 s start-up deadline "
                                       r"3 times \(load average [\d.]+ on \d+ cores\); run again when"):
        runtime._start_local_ray(fake, 2)
    assert fake.inits == runtime.START_ATTEMPTS


def test_any_other_failure_to_start_ray_is_not_retried():
    class Broken(SlowNodeRay):
        def init(self, **kwargs):
            self.inits += 1
            raise ValueError("bad argument")

    fake = Broken(0)
    with pytest.raises(ValueError, match="bad argument"):
        runtime._start_local_ray(fake, 2)
    assert fake.inits == 1

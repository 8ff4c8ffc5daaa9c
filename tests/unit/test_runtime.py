"""What mmray keeps of Ray's own output on the user's terminal (no Ray started)."""
from __future__ import annotations

import logging

from mmray import runtime


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

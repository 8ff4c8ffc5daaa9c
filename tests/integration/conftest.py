"""Fixtures shared by the integration tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray for the tests of one module (no dashboard; workers' output stays in Ray's session logs),
    shut down after its last test. Ray Data's CPU limit is set to match (``configure_data_context``)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from mmray.data.pipeline import configure_data_context

    configure_data_context(cpu_limit=2)
    yield ray
    ray.shutdown()

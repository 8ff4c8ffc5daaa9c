"""Fixtures of the CLI refusal tests (bad input exits 2 with one ``mmray: ...`` line, before Ray starts and before
anything is written; the checks themselves are ``helpers.fails`` / ``helpers.written``)."""
from __future__ import annotations

import sys

import pytest

from mmray.data.synth import synth


def _ray_started(*_, **__):
    raise AssertionError("Ray started: bad input must be refused before")


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire on the two ways a command starts Ray (training's ``fit``, a sweep's ``run_sweep``), and a check
    afterwards that no Ray is up."""
    import mmray.train.trainer
    import mmray.tune.sweep

    monkeypatch.setattr(mmray.train.trainer, "fit", _ray_started)
    monkeypatch.setattr(mmray.tune.sweep, "run_sweep", _ray_started)
    yield
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("refused") / "synth"
    synth(str(out), rows=60, shards=1, seed=0)
    return str(out)

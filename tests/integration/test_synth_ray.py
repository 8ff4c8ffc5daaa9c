"""`mmray data synth --ray`: the shards written by Ray tasks are the bytes one process writes (real local Ray)."""
from __future__ import annotations

import os

import pytest

from mmray.data.synth import synth

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _shard_bytes(root: str) -> dict[str, bytes]:
    return {f"{split}/{name}": open(os.path.join(root, split, name), "rb").read()
            for split in ("train", "val", "test") for name in sorted(os.listdir(os.path.join(root, split)))}


def test_ray_tasks_write_the_same_shards_as_one_process(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray of our own, never a cluster left running
    lines = []

    class Count:
        def add(self, rows):
            lines.append(rows)

    try:
        on_ray = synth(str(tmp_path / "ray"), rows=300, shards=3, seed=4, ray=True, progress=Count())
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    serial = synth(str(tmp_path / "serial"), rows=300, shards=3, seed=4, workers=1)
    assert _shard_bytes(on_ray.path) == _shard_bytes(serial.path)
    assert on_ray.splits == serial.splits
    assert sum(lines) == 300  # every row group's progress came back from the tasks

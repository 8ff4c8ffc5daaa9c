"""The built-in dataset is a fusion benchmark: no single modality comes close to all three together.

Each model trains in-process (the same loop as under Ray, no Ray) with an identical budget.
"""
from __future__ import annotations

import pytest
from helpers import small_job

from mmray.data.synth import synth
from mmray.train.local import train_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fusion") / "synth")
    synth(out, rows=2000, shards=2, seed=3)
    return out


def best_val_accuracy(data: str, modalities, tmp_path, epochs: int) -> float:
    config = small_job(data, modalities=modalities, epochs=epochs, workers=1, batch_size=32)
    state, _ = train_local(config, str(tmp_path / "-".join(modalities)))
    return state.best_value


def test_each_modality_alone_is_clearly_below_all_three(data, tmp_path):
    fused = best_val_accuracy(data, ("audio", "image", "text"), tmp_path, epochs=8)
    alone = {m: best_val_accuracy(data, (m,), tmp_path, epochs=4) for m in ("audio", "image", "text")}
    # ceilings by design: image 0.50, audio 0.33, text ~0.43; all three ~1.0
    assert fused > 0.75, fused
    for modality, acc in alone.items():
        assert acc < fused - 0.2, (modality, acc, fused)
        assert acc < 0.6, (modality, acc)
    print(f"fused {fused:.3f}; alone {alone}")

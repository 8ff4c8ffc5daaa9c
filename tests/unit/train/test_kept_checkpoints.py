"""Finding the best kept checkpoint of a run from its folder names and the history in its latest checkpoint."""
import os

import torch

from mmray.train.checkpoint import STATE, kept_checkpoints
from mmray.train.finalize import best_kept


def _run(tmp_path, accuracies: dict[int, float], kept: list[int]) -> str:
    history = [{"epoch": float(e), "val.accuracy": a} for e, a in sorted(accuracies.items())]
    for epoch in kept:
        folder = tmp_path / f"checkpoint_epoch_{epoch:04d}"
        folder.mkdir()
        state = {"epoch": epoch, "history": [m for m in history if m["epoch"] <= epoch]}
        torch.save({"train_state": state}, folder / STATE)
    (tmp_path / "tensorboard").mkdir()  # other folders of a run are not checkpoints
    return str(tmp_path)


def test_the_best_kept_epoch_wins_not_the_best_epoch_overall(tmp_path):
    run = _run(tmp_path, {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7}, kept=[3, 4])  # epoch 2 was pruned
    kept = kept_checkpoints(run)
    assert sorted(kept) == [3, 4]
    assert best_kept(kept, "val.accuracy", "max") == os.path.join(run, "checkpoint_epoch_0004")
    assert best_kept(kept, "val.accuracy", "min") == os.path.join(run, "checkpoint_epoch_0003")


def test_nothing_kept_or_scored_is_none(tmp_path):
    assert best_kept({}, "val.accuracy", "max") is None
    run = _run(tmp_path, {1: 0.5}, kept=[1])
    assert best_kept(kept_checkpoints(run), "val.f1", "max") is None

"""No pickle from storage: a planted ``state.pt`` never runs, and the user is told which file it is."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml
from helpers import small_job

from mmray.cli.main import main
from mmray.config.errors import UserError
from mmray.data.synth import synth
from mmray.train.checkpoint import STATE, read_state, read_train_state
from mmray.train.local import train_local


class _Payload:
    """What an attacker plants: unpickling it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(checkpoint_dir: str, marker: str) -> str:
    path = os.path.join(checkpoint_dir, STATE)
    torch.save({"train_state": {"epoch": 1}, "x": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    synth(str(root / "synth"), rows=60, shards=1, seed=0)
    config = small_job(str(root / "synth"), workers=1, epochs=1, name="planted")
    run_dir = str(root / "runs" / "planted")
    train_local(config, run_dir)
    return root, config, run_dir


def test_a_state_mmray_wrote_reads_back(trained):
    _, _, run_dir = trained
    state = read_state(os.path.join(run_dir, "checkpoint_epoch_0001"))
    assert state["train_state"]["epoch"] == 1 and "optimizer" in state


def test_a_planted_pickle_is_refused_by_every_reader_and_never_runs(trained, tmp_path):
    root, config, run_dir = trained
    bad = str(tmp_path / "run")
    import shutil

    shutil.copytree(run_dir, bad)
    marker = tmp_path / "pwned"
    path = _plant(os.path.join(bad, "checkpoint_epoch_0001"), str(marker))
    for read in (lambda: train_local(config.model_copy(update={"train": config.train.model_copy(
                     update={"epochs": 2})}), bad),  # the resume path of the loop
                 lambda: read_train_state(os.path.join(bad, "checkpoint_epoch_0001"))):  # export, report, compare
        with pytest.raises(UserError, match="refused to unpickle") as e:
            read()
        assert path in str(e.value)
    assert not marker.exists()


def test_train_on_a_planted_run_exits_2_naming_the_file_before_ray_starts(trained, tmp_path, capsys):
    root, config, run_dir = trained
    storage = tmp_path / "runs"
    import shutil

    shutil.copytree(run_dir, storage / "planted")
    marker = tmp_path / "pwned"
    path = _plant(str(storage / "planted" / "checkpoint_epoch_0001"), str(marker))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["train", str(job), "--name", "planted", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmray: ") and path in err and "nothing in it was run" in err
    assert not marker.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()

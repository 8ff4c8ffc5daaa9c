"""What `mmray train` decides before Ray starts: run folder state, finished names, unwritable storage."""
from __future__ import annotations

import os
import sys

import pytest
import yaml
from helpers import small_job
from storage_fixtures import read_only_dir  # noqa: F401  (fixture)

from mmray.cli.main import main
from mmray.data.synth import synth
from mmray.train.outputs import resolve_run_dir


def test_run_folder_is_new_resumed_or_finished(tmp_path):
    runs = str(tmp_path / "runs")
    assert resolve_run_dir(runs, "a", explicit_name=True) == (os.path.join(runs, "a"), "new")
    os.makedirs(os.path.join(runs, "a", "checkpoint_epoch_0001"))
    assert resolve_run_dir(runs, "a", explicit_name=True) == (os.path.join(runs, "a"), "resume")
    os.makedirs(os.path.join(runs, "a", "export"))
    assert resolve_run_dir(runs, "a", explicit_name=True) == (os.path.join(runs, "a"), "finished")
    assert resolve_run_dir(runs, "a", explicit_name=False) == (os.path.join(runs, "a-2"), "new")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    synth(str(root / "synth"), rows=60, shards=1, seed=0)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(small_job(str(root / "synth"), workers=1).model_dump(mode="json")))
    return str(job)


def test_unwritable_storage_exits_2_before_ray_starts(job_file, read_only_dir, capsys):
    storage = os.path.join(read_only_dir, "runs")
    assert main(["train", job_file, "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert f"--storage: cannot write to {storage}" in err and "choose a writable location" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_old_failures_key_says_where_it_went(job_file, capsys):
    assert main(["train", job_file, "--set", "scaling.max_failures=2"]) == 2
    assert "scaling.max_failures: moved to train.max_failures; set train.max_failures: 2 instead" in capsys.readouterr().err

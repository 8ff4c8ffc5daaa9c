"""What ``scaling.strategy: fsdp`` does not compose with is refused before Ray starts: exit 2, one message naming
the dotted keys and their values, nothing written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import fails, job_file, written

from mmray.cli.main import main

pytestmark = pytest.mark.usefixtures("no_ray")


@pytest.fixture()
def job(data_dir, tmp_path) -> Path:
    return job_file(data_dir, tmp_path, workers=2)


@pytest.mark.parametrize("verb", ["train", "validate"])
def test_fsdp_on_one_worker_is_refused(job, tmp_path, capsys, verb):
    err = fails(capsys, verb, str(job), "--set", "scaling.strategy=fsdp", "--set", "scaling.num_workers=1")
    assert "scaling.strategy: 'fsdp'" in err and "scaling.num_workers is 1" in err
    assert written(tmp_path) == []


@pytest.mark.parametrize(("sets", "named"), [
    (["train.precision=fp16", "scaling.use_gpu=true"], "train.precision: 'fp16'"),
    (["train.compile=default"], "train.compile: 'default'"),
    (["train.channels_last='on'"], "train.channels_last: 'on'"),
])
def test_fsdp_refuses_what_it_does_not_support(job, tmp_path, capsys, sets, named):
    err = fails(capsys, "train", str(job), "--set", "scaling.strategy=fsdp", *[a for s in sets for a in ("--set", s)])
    assert "scaling.strategy: 'fsdp'" in err and named in err
    assert written(tmp_path) == []


def test_fsdp_with_every_encoder_frozen_and_the_embedding_cache_is_refused(job, tmp_path, capsys):
    frozen = [a for m in ("audio", "image", "text") for a in ("--set", f"model.encoders.{m}.freeze=true")]
    argv = ["validate", str(job), "--set", "scaling.strategy=fsdp", "--set", "data.image.augment=false", *frozen]
    err = fails(capsys, *argv)
    assert "model.encoders.audio.freeze, model.encoders.image.freeze, model.encoders.text.freeze: true" in err
    assert "train.embedding_cache: 'auto'" in err and "train.embedding_cache: 'off'" in err
    # the frozen encoders run sharded when the cache is off
    assert main([*argv, "--set", "train.embedding_cache='off'"]) == 0


@pytest.mark.parametrize(("sharded", "now"), [(False, "fsdp"), (True, "ddp")])
def test_resuming_under_the_other_strategy_is_refused(job, tmp_path, capsys, sharded, now):
    checkpoint = tmp_path / "runs" / "r" / "checkpoint_epoch_0001"
    checkpoint.mkdir(parents=True)
    torch.save({"optimizer": None, "scheduler": {}, "scaler": None, "train_state": {"epoch": 1}},
               checkpoint / "state.pt")
    if sharded:
        (checkpoint / ".metadata").write_bytes(b"")
    before = sorted(os.listdir(checkpoint))
    err = fails(capsys, "train", str(job), "--name", "r", "--set", f"scaling.strategy={now}")
    was = "ddp" if now == "fsdp" else "fsdp"
    assert f"scaling.strategy: {now!r}, but the checkpoint to resume from, {checkpoint}" in err
    assert f"was written by a scaling.strategy: {was!r} run" in err
    assert sorted(os.listdir(checkpoint)) == before and written(tmp_path) == ["r"]

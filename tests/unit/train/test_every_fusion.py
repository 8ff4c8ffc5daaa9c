"""`mmray train jobs/quickstart.yaml --set model.fusion.name=X` for every fusion X, without Ray: the CLI's config
path (the real quickstart file plus `--set` overrides), then the shared loop on a tiny dataset, the export and
`mmray evaluate`. The real Ray run of one fusion is in tests/integration/test_fusion_cli.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmray.cli.main import main
from mmray.config import load_job
from mmray.data.dataset_dir import read_dataset_info
from mmray.data.synth import synth
from mmray.export.evaluate import evaluate
from mmray.models.fusion import FUSIONS
from mmray.train.finalize import export_checkpoint
from mmray.train.local import train_local

QUICKSTART = str(Path(__file__).resolve().parents[3] / "jobs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("zoo") / "synth")
    synth(out, rows=48, shards=1, seed=5)
    return out


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_quickstart_trains_evaluates_and_exports_with_each_fusion(fusion, data, tmp_path, capsys):
    overrides = [f"model.fusion.name={fusion}", f"data.path={data}", "train.epochs=1", "train.batch_size=16"]
    assert main(["render-config", QUICKSTART, *[a for o in overrides for a in ("--set", o)]]) == 0
    assert f"name: {fusion}" in capsys.readouterr().out
    config = load_job(QUICKSTART, overrides)  # exactly what `mmray train` validates
    assert config.model.fusion.name == fusion
    state, ctx = train_local(config, str(tmp_path / "run"))
    assert state.epoch == 1 and math.isfinite(state.history[0]["train.loss"])
    metrics = export_checkpoint(config, read_dataset_info(data), ctx.checkpoints[-1], str(tmp_path / "export"))
    result = evaluate(str(tmp_path / "export"), data, split="test", diagnostics=False)
    assert result["accuracy"] == pytest.approx(metrics["test.accuracy"])

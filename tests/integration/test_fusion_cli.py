"""The real command, `mmray train jobs/quickstart.yaml --set model.fusion.name=X`, on a local Ray for one fusion
(cross_attention: the one that reads the encoders' sequences). Every fusion goes through the same config path and
loop in tests/unit/train/test_every_fusion.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

from mmray.data.synth import synth

pytestmark = [pytest.mark.slow, pytest.mark.ray]
QUICKSTART = str(Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml")


def test_mmray_train_quickstart_with_another_fusion(tmp_path):
    data = str(tmp_path / "synth")
    synth(data, rows=80, shards=1, seed=7)
    sets = ["model.fusion.name=cross_attention", f"data.path={data}", "train.epochs=1", "scaling.num_workers=1"]
    argv = ["train", QUICKSTART, *[a for s in sets for a in ("--set", s)], "--storage", str(tmp_path / "runs")]
    code = f"import sys\nfrom mmray.cli.main import main\nsys.exit(main({argv!r}))\n"
    # a hang guard, not a speed check: one epoch takes seconds on a quiet box, minutes on a saturated one
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "runs" / "quickstart" / "export"
    assert f"export:      {export}" in proc.stdout
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and "test.diagnostics.without_image.accuracy" in metrics
    config = (export / "config.yaml").read_text()
    assert "name: cross_attention" in config

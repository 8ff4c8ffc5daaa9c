"""``scaling.strategy: fsdp`` on 2 Ray Train workers (gloo): the run says how the parameters are spread, each rank's
shards land in the one checkpoint folder, a killed worker's group resumes from that sharded checkpoint
(``train.max_failures: 1``), and the export is one whole ``model.safetensors`` equal to the gathered checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import HANG_S, small_job, train_workers, wait_for_registered_checkpoint

from mmray.data.synth import synth

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_fsdp_run_shards_resumes_from_its_sharded_checkpoint_and_exports_whole(tmp_path):
    from safetensors.torch import load_file

    from mmray.data.dataset_dir import read_dataset_info
    from mmray.data.tokenizer import TextTokenizer
    from mmray.export import load_model
    from mmray.models.builder import job_tasks
    from mmray.train.checkpoint import kept_checkpoints, read_config
    from mmray.train.checkpoint import load_model as load_checkpoint_model

    data = str(tmp_path / "synth")
    synth(data, rows=240, shards=2, seed=0)
    raw = small_job(data, name="f", epochs=3, workers=2, batch_size=16, max_failures=1).model_dump(mode="json")
    raw["scaling"]["strategy"] = "fsdp"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "f"
    proc = subprocess.Popen([sys.executable, "-m", "mmray.cli.main", "train", str(job), "--storage",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        # the event: Ray has registered epoch 1's checkpoint (every rank's shards of it)
        wait_for_registered_checkpoint(run_dir, 1, lambda: proc.stdout.read() if proc.poll() is not None else None)
        workers = train_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    shares = re.findall(r"^fsdp: rank 0 holds ([\d.]+)% of \S+ parameters, rank 1 ([\d.]+)%", out, re.M)
    assert shares, out  # once per worker-group start
    assert all(45.0 <= float(s) <= 55.0 for pair in shares for s in pair), shares
    resumed = re.search(r"restarting from epoch (\d+)'s checkpoint", out)
    assert resumed, out
    assert f"resuming after epoch {resumed.group(1)} from" in out
    history = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [int(m["epoch"]) for m in history] == [1, 2, 3]

    kept = kept_checkpoints(str(run_dir))
    latest = kept[max(kept)]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"} <= set(os.listdir(latest))
    assert "model.safetensors" not in os.listdir(latest)

    export = run_dir / "export"
    best_epoch = json.load(open(export / "metrics.json"))["epoch"]
    exported = load_file(str(export / "model.safetensors"))
    config = read_config(kept[best_epoch])
    info = read_dataset_info(data)
    gathered = load_checkpoint_model(config, job_tasks(info.tasks), TextTokenizer.for_job(config.data, info),
                                     kept[best_epoch])
    assert exported.keys() == gathered.state_dict().keys()
    assert all(torch.equal(v, gathered.state_dict()[k]) for k, v in exported.items())
    assert len(load_model(str(export)).predict(texts=["a red square"])) == 1

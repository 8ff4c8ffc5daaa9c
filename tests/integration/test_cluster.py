"""`mmray submit` / `mmray jobs` on a real 2-node Ray cluster on this host, token auth on.

One cluster for the module (head + second node, private temp dir, ports and token; ~10 s to start); the
tests stop only its own processes. Which node each Train worker ran on is read from Ray's state API.
The tune-on-the-cluster test (~95 s more) runs with MMRAY_TEST_CLUSTER_TUNE=1.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HANG_S
from local_cluster import LocalCluster

from mmray.data.synth import synth

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = str(Path(__file__).resolve().parents[2])
MMRAY = os.path.join(os.path.dirname(sys.executable), "mmray")
CHANCE = 1 / 6


@pytest.fixture(scope="module")
def cluster():
    # PYTHONPATH: the cluster's processes import this checkout's mmray, as an installed one would be
    c = LocalCluster(head_cpus=2, node_cpus=1, extra_env={"PYTHONPATH": REPO}).start()
    try:
        synth(os.path.join(c.root, "shared", "data"), rows=600, shards=2, seed=0)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def in_process(cluster, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The same CLI in this process (no start-up cost), with the same environment as :func:`mmray`."""
    from mmray.cli.main import main

    for key in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster.token_path)
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert Path(cluster.token_path).read_text().strip() not in out + err
    return rc, out, err


def mmray(cluster: LocalCluster, *args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """The CLI as a user runs it from the project folder: the token in a file, no RAY_AUTH_MODE set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_TOKEN_PATH=cluster.token_path, PYTHONPATH=REPO)
    proc = subprocess.run([MMRAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    token = Path(cluster.token_path).read_text().strip()
    assert token not in proc.stdout + proc.stderr
    return proc


def job_args(cluster: LocalCluster, verb: str, name: str, *sets: str) -> list[str]:
    shared = os.path.join(cluster.root, "shared")
    args = [verb, "jobs/quickstart.yaml", "--set", f"data.path={shared}/data", "--storage", f"{shared}/runs",
            "--name", name, "--set", "train.early_stopping.patience=null"]
    for s in sets:
        args += ["--set", s]
    return args


def submitted_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("job:"))


@pytest.fixture(scope="module")
def two_node_run(cluster):
    t0 = time.monotonic()
    proc = mmray(cluster, "submit", "--address", cluster.url, "--wait", "--",
                 *job_args(cluster, "train", "two-nodes", "train.epochs=2", "scaling.num_workers=2",
                           "scaling.placement_strategy=STRICT_SPREAD"))
    print(f"submit --wait train: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return submitted_id(proc.stdout), proc


def test_submit_wait_prints_the_job_and_streams_it_to_success(cluster, two_node_run):
    job_id, proc = two_node_run
    out = proc.stdout
    assert job_id.startswith("raysubmit_")
    assert f"dashboard:  {cluster.url}  (token auth (RAY_AUTH_TOKEN_PATH" in out
    assert f"mmray jobs logs {job_id} --follow --address {cluster.url}" in out
    assert "mmray epoch=2/2" in out and f"job {job_id}: SUCCEEDED" in out


def test_the_two_train_workers_ran_on_two_different_nodes(cluster, two_node_run):
    job_id, _ = two_node_run
    ray_job_id = cluster.get(f"/api/jobs/{job_id}")["job_id"]
    workers = [a for a in cluster.actors("RayTrainWorker") if a["job_id"] == ray_job_id]
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert len(workers) == 2 and len(nodes) == 2
    assert {w["node_id"] for w in workers} == nodes


def test_checkpoints_tensorboard_and_export_land_in_shared_storage(cluster, two_node_run):
    run_dir = os.path.join(cluster.root, "shared", "runs", "two-nodes")
    assert glob.glob(f"{run_dir}/checkpoint_epoch_*") and glob.glob(f"{run_dir}/tensorboard/events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.load(open(f"{run_dir}/export/metrics.json"))
    assert os.path.isfile(f"{run_dir}/export/model.safetensors")
    acc = EventAccumulator(f"{run_dir}/tensorboard")
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns: 2 epochs on 450 rows
    assert metrics["val.accuracy"] > CHANCE, metrics


def test_jobs_list_status_and_logs_show_the_job(cluster, two_node_run, monkeypatch, capsys):
    job_id, _ = two_node_run
    rc, out, _ = in_process(cluster, monkeypatch, capsys, "jobs", "list", "--address", cluster.url)
    assert rc == 0 and any(job_id in line and "SUCCEEDED" in line for line in out.splitlines())
    rc, out, _ = in_process(cluster, monkeypatch, capsys, "jobs", "status", job_id, "--address", cluster.url)
    assert "status:     SUCCEEDED" in out and "mmray train jobs/quickstart.yaml" in out
    rc, out, _ = in_process(cluster, monkeypatch, capsys, "jobs", "logs", job_id, "--address", cluster.url)
    assert "mmray epoch=2/2" in out
    rc, _, err = in_process(cluster, monkeypatch, capsys, "jobs", "status", "raysubmit_nope", "--address", cluster.url)
    assert rc == 2 and "no job 'raysubmit_nope'" in err


def test_stop_stops_a_running_job(cluster, two_node_run, monkeypatch, capsys):
    proc = mmray(cluster, "submit", "--address", cluster.url, "--",
                 *job_args(cluster, "train", "to-stop", "train.epochs=50", "scaling.num_workers=1"))
    assert proc.returncode == 0, proc.stderr
    job_id = submitted_id(proc.stdout)
    deadline = time.monotonic() + HANG_S
    while cluster.get(f"/api/jobs/{job_id}")["status"] != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(1)
    rc, out, _ = in_process(cluster, monkeypatch, capsys, "jobs", "stop", job_id, "--address", cluster.url)
    assert rc == 0 and f"job {job_id}: STOPPED" in out
    assert cluster.get(f"/api/jobs/{job_id}")["status"] == "STOPPED"


@pytest.mark.skipif(os.environ.get("MMRAY_TEST_CLUSTER_TUNE") != "1", reason="~95 s more: MMRAY_TEST_CLUSTER_TUNE=1")
def test_submit_wait_tune_runs_a_sweep_on_the_cluster(cluster, two_node_run):
    t0 = time.monotonic()
    proc = mmray(cluster, "submit", "--address", cluster.url, "--wait", "--",
                 *job_args(cluster, "tune", "sweep", "train.epochs=1", "scaling.num_workers=1"),
                 "--space", "search_spaces/quick.yaml", "--num-samples", "2")
    print(f"submit --wait tune: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(os.path.join(cluster.root, "shared", "runs", "sweep", "leaderboard.csv"))))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert os.path.isfile(os.path.join(cluster.root, "shared", "runs", "sweep", "best", "model.safetensors"))

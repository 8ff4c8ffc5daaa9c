"""`mmray data prepare` on a real 2-node Ray cluster on this host: Ray tasks on both nodes check, decode and
write the shards, and the dataset is the serial one (same rows in order, same bytes, same decisions and counts).

The cluster (head 1 CPU + a second node 1 CPU, token auth, private ports) is stopped by its own process
groups; this process joins it as a user's driver would (``RAY_ADDRESS``).
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S
from local_cluster import LocalCluster

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "data"))

from prepare_media import make_folder, write_manifest  # noqa: E402
from test_prepare import COLUMNS, assert_same_dataset  # noqa: E402

from mmray.data.prepare import prepare  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=1, node_cpus=1, extra_env={"PYTHONPATH": REPO}).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


RUN = """
import pickle, sys
from test_prepare import COLUMNS
from mmray.data.prepare import prepare
report = prepare(sys.argv[1], sys.argv[2], columns=COLUMNS, ray="on", chunk_rows=8)
with open(sys.argv[3], "wb") as f:
    pickle.dump(report, f)
"""


def test_prepare_on_two_nodes_gives_the_serial_dataset(cluster, tmp_path):
    made = make_folder(str(tmp_path), good_rows=60)
    manifest = write_manifest(str(tmp_path), made["rows"], "csv")
    serial = prepare(manifest, str(tmp_path / "serial"), columns=COLUMNS, workers=1, ray="off")
    assert serial.ray_tasks == 0
    # a driver joining the cluster as a user's would: its address and token in the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS=cluster.gcs, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=cluster.token_path,
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "unit", "data")]))
    proc = subprocess.run([sys.executable, "-c", RUN, manifest, str(tmp_path / "ray"), str(tmp_path / "report")],
                          env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "report", "rb") as f:
        on_ray = pickle.load(f)
    assert 2 < on_ray.ray_tasks <= -(-serial.rows_in // 8)  # a chunk whose rows all fail the row checks needs no task
    assert_same_dataset(serial, on_ray)
    tasks = cluster.get("/api/v0/tasks?limit=1000&detail=1&filter_keys=name&filter_predicates=%3D"
                        "&filter_values=prepare_chunk")["data"]["result"]["result"]
    finished = [t for t in tasks if t["state"] == "FINISHED"]
    assert len(finished) >= on_ray.ray_tasks
    assert len({t["node_id"] for t in finished}) == 2, "the tasks ran on one node only"

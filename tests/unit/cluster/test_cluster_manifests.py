"""The cluster files in cluster/ parse, and every Ray version and image tag in them is the Ray mmray pins."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
tomllib = pytest.importorskip("tomllib")

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
PYPROJECT = CLUSTER.parent / "pyproject.toml"
# Ray's tags: <ray version>-py3XX[-cpu|-gpu]; a Python mmray supports (requires-python >= 3.10)
PY_TAG = r"py3(1\d|[2-9]\d)"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _kind(kind: str) -> list[dict]:
    return [d for f in ("kuberay/raycluster.yaml", "kuberay/rayjob-tune.yaml") for d in _docs(f) if d["kind"] == kind]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_image(image: str) -> None:
    repo, tag = image.rsplit(":", 1)
    if repo.startswith("rayproject/"):
        assert re.fullmatch(rf"{re.escape(ray.__version__)}-{PY_TAG}(-cpu|-gpu)?", tag), image
    else:  # our image built FROM Ray's (cluster/Dockerfile): its tag names the Ray inside
        assert re.search(rf"-ray{re.escape(ray.__version__)}-{PY_TAG}-gpu$", tag), image


def test_installed_ray_is_the_one_pyproject_pins():
    pins = [d for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"] if d.startswith("ray[")]
    low, high = re.search(r">=([\d.]+),<([\d.]+)", pins[0]).groups()
    version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    assert tuple(int(x) for x in low.split(".")[:2]) <= version < tuple(int(x) for x in high.split(".")[:2])


def test_dockerfile_builds_on_the_pinned_ray_image():
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu")
    _check_image(base)


def test_cluster_launcher_yaml_has_a_cpu_head_gpu_workers_and_token_auth():
    (cfg,) = _docs("aws-gpu.yaml")
    assert cfg["docker"]["head_image"].endswith("-cpu") and cfg["docker"]["worker_image"].endswith("-gpu")
    for image in (cfg["docker"]["head_image"], cfg["docker"]["worker_image"]):
        _check_image(image)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())
    for cmd in cfg["head_start_ray_commands"][-1:] + cfg["worker_start_ray_commands"][-1:]:
        assert cmd.startswith("RAY_AUTH_MODE=token ray start"), cmd
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][-1]  # reached through `ray dashboard`
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]


def test_kuberay_cluster_has_the_pinned_ray_a_cpu_head_gpu_workers_and_token_auth_everywhere():
    (cluster,) = _kind("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = _containers(spec["headGroupSpec"]["template"])
    workers = [c for g in spec["workerGroupSpecs"] for c in _containers(g["template"])]
    assert "nvidia.com/gpu" not in head[0]["resources"]["limits"]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] for c in workers)
    (job,) = _kind("RayJob")
    submitter = _containers(job["spec"]["submitterPodTemplate"])
    for c in head + workers + submitter:
        _check_image(c["image"])
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mmray-auth-token"


def test_kuberay_job_runs_mmray_tune_on_that_cluster_with_shared_storage():
    (job,) = _kind("RayJob")
    (cluster,) = _kind("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["mmray", "tune"] and "--space" in entry
    storage = entry[entry.index("--storage") + 1]
    mounts = {m["mountPath"] for c in _containers(cluster["spec"]["headGroupSpec"]["template"])
              for m in c["volumeMounts"]}
    assert any(storage.startswith(m) for m in mounts)
    from mmray.config import load_job

    repo = CLUSTER.parent
    for path in (entry[2], entry[entry.index("--space") + 1]):  # the files the image carries exist here
        assert (repo / path.removeprefix("/home/ray/mmray/")).is_file(), path
    load_job(str(repo / entry[2].removeprefix("/home/ray/mmray/")), [])

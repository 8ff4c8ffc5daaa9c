"""A real 2-node Ray cluster on this host for tests: token auth on, private temp dir and ports, and a
teardown that stops only the processes it started (by their process group), never `ray stop`."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from helpers import HANG_S

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all held open while choosing, so none is picked twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node_ports(ports: list[int], worker_base: int) -> list[str]:
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [x for flag, port in zip(flags, ports) for x in (flag, str(port))] + [
        "--min-worker-port", str(worker_base), "--max-worker-port", str(worker_base + 199)]


class LocalCluster:
    """``ray start --head`` on 127.0.0.1 plus ``ray start --address`` for ``nodes - 1`` more nodes (the second is
    ``node2``, with a custom resource of that name, and so on), all with ``RAY_AUTH_MODE=token`` and a fresh token
    in a private file (``RAY_AUTH_TOKEN_PATH``), each node with its own temp dir and ports."""

    def __init__(self, head_cpus: int = 2, node_cpus: int = 1, extra_env: dict[str, str] | None = None,
                 nodes: int = 2, object_store_mb: int | None = None):
        self.root = tempfile.mkdtemp(prefix="mmrc-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        self.token_path = os.path.join(self.root, "auth_token")
        with open(self.token_path, "w") as f:
            f.write(secrets.token_hex(32))
        # every port this cluster uses, chosen together; workers get a range below the ephemeral ports
        self.nodes = nodes
        self._ports = free_ports(3 + 6 * nodes)
        self.gcs_port, self.dashboard_port = self._ports[:2]
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                         "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0", "PATH": f"{os.path.dirname(sys.executable)}:"
                         f"{os.environ.get('PATH', '')}", **(extra_env or {})})
        self.head_cpus, self.node_cpus = head_cpus, node_cpus
        self._store = ["--object-store-memory", str(object_store_mb * 1024 * 1024)] if object_store_mb else []
        self.procs: list[subprocess.Popen] = []

    @property
    def headers(self) -> dict[str, str]:
        with open(self.token_path) as f:
            return {"Authorization": f"Bearer {f.read().strip()}"}

    def _start(self, args: list[str], log: str) -> None:
        out = open(os.path.join(self.root, log), "w")
        # --block keeps every Ray process of the node in this process group: teardown kills the group
        self.procs.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                           env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout: float = HANG_S) -> "LocalCluster":
        span = 200 * self.nodes  # each node's worker ports: 200 of them
        base = 20000 + secrets.randbelow(max(1, 10000 // span)) * span
        try:
            self._start(["--head", "--node-ip-address=127.0.0.1", "--port", str(self.gcs_port),
                         "--dashboard-host=127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                         "--ray-client-server-port", str(self._ports[2]), "--num-cpus", str(self.head_cpus),
                         "--temp-dir", os.path.join(self.root, "head"), *_node_ports(self._ports[3:9], base),
                         *self._store], "head.log")
            self.wait_nodes(1, timeout)
            for n in range(2, self.nodes + 1):
                ports = self._ports[3 + 6 * (n - 1):3 + 6 * n]
                self._start(["--address", self.gcs, "--node-ip-address=127.0.0.1", "--num-cpus", str(self.node_cpus),
                             "--resources", json.dumps({f"node{n}": 1}), "--temp-dir",
                             os.path.join(self.root, f"node{n}"), *_node_ports(ports, base + 200 * (n - 1)),
                             *self._store], f"node{n}.log")
            self.wait_nodes(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def get(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", headers=self.headers)
        with urllib.request.urlopen(req, timeout=HANG_S) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """From Ray's state API (``/api/v0/nodes``)."""
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        """Every actor of ``class_name``, dead or alive, from Ray's state API (``/api/v0/actors``)."""
        q = f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        return self.get(q)["data"]["result"]["result"]

    def wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited {p.returncode}; see {self.root}/*.log")
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray nodes not up after {timeout} s; see {self.root}")
            time.sleep(1)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM, then SIGKILL, to the process groups this cluster started (each ``ray start --block``
        and every Ray process it spawned), and nothing else."""
        groups = [p.pid for p in self.procs]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
                for p in self.procs:
                    p.poll()  # reap the leaders
                time.sleep(0.2)
        for p in self.procs:
            p.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

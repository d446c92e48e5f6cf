"""The MongoDB side of the local runtime: a SecantusDB server, or a user-given replica set URI.

No mongod can be installed here, so the local runtime runs SecantusDB (a MongoDB-wire-protocol
server on WiredTiger, pinned in pyproject.toml) on 127.0.0.1, which answers drivers as a
single-member replica set. What the mirror should talk to is recorded in ``DIR/mongo.json``;
``external`` URIs (any real replica set) are never started or stopped by us.

The server runs as the unprivileged service user when we are root (like PostgreSQL), in its own
session so a Ctrl-C of the CLI does not reach it, and is stopped by PID: SIGTERM, then a wait
(it needs 3-10 s to close WiredTiger), then SIGKILL after a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from orchestrator import logfiles
from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.osuser import service_user
from orchestrator.runtime.layout import data_root
from orchestrator.runtime.ports import free_port, is_listening

log = logging.getLogger(__name__)

CONFIG_FILE = "mongo.json"
SERVER_DIR = "mongo"
HOST = "127.0.0.1"
REPLICA_SET = "secantus"  # SecantusDB's set name (its CLI has no option to change it)
DEFAULT_DATABASE = "buildsmart"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_LAUNCHER = "import sys; from secantus.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class MongoConfig:
    """Where the mirror writes: ``managed`` servers are ours, others are only connected to."""

    uri: str
    database: str = DEFAULT_DATABASE
    managed: bool = True
    port: int | None = None
    pid: int | None = None


def server_dir(directory: Path) -> Path:
    """Where the managed server keeps its data: DIR/mongo, or, when the service user cannot reach
    DIR (a checkout under /root or in a mktemp -d directory), next to the members' data under
    /var/lib/buildsmart (layout.data_root), which the service user owns."""
    if service_user().can_traverse(directory):
        return directory / SERVER_DIR
    return data_root(directory, service_user()) / SERVER_DIR


def _config_path(directory: Path) -> Path:
    return directory / CONFIG_FILE


def load_config(directory: Path) -> MongoConfig | None:
    path = _config_path(directory)
    try:
        data = json.loads(path.read_text())
        return MongoConfig(**data)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid MongoDB config: {exc}") from exc


def _save_config(directory: Path, config: MongoConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = _config_path(directory)
    tmp = path.with_suffix(".json.tmp")
    # 0600: a user-given URI may carry a password.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(config), indent=2) + "\n")
    os.replace(tmp, path)


def require_config(directory: Path) -> MongoConfig:
    config = load_config(directory)
    if config is None:
        raise ConfigError(
            f"no MongoDB configured for {directory} ({CONFIG_FILE} missing): run `buildsmart up`,"
            " or `buildsmart mirror target URI` for an existing replica set"
        )
    return config


def mongo_uri(directory: Path) -> str:
    """The URI for `buildsmart dsn --mongo`."""
    return require_config(directory.resolve()).uri


def use_external(directory: Path, uri: str, database: str = DEFAULT_DATABASE) -> MongoConfig:
    """Point the mirror at a MongoDB replica set we do not run (stops a local server first)."""
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"not a MongoDB URI: {uri!r} (expected mongodb://... or mongodb+srv://...)")
    directory = directory.resolve()
    current = load_config(directory)
    if current is not None and current.managed:
        stop(directory)
    config = MongoConfig(uri=uri, database=database, managed=False)
    _save_config(directory, config)
    log.info("mirror target set to an external MongoDB (database %s)", database)
    return config


def _server_process(config: MongoConfig, data_dir: Path) -> psutil.Process | None:
    """The recorded server process, if it is still ours (guards against PID reuse)."""
    if config.pid is None:
        return None
    try:
        proc = psutil.Process(config.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc if str(data_dir) in cmdline else None


def is_running(directory: Path) -> bool:
    directory = directory.resolve()
    config = load_config(directory)
    if config is None or not config.managed:
        return False
    return _server_process(config, server_dir(directory) / "data") is not None


def _wait_ready(uri: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise NodeError(f"SecantusDB exited with {proc.returncode} while starting; log {log_path}:\n{tail}")
        try:
            client: MongoClient[dict[str, object]]
            with MongoClient(uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500) as client:
                hello = client.admin.command("hello")
            if hello.get("isWritablePrimary") and hello.get("setName"):
                return
        except PyMongoError:
            pass
        time.sleep(0.2)
    raise NodeError(f"SecantusDB did not answer as a replica-set primary within {START_TIMEOUT_S:.0f} s; log {log_path}")


def ensure_started(directory: Path) -> str:
    """Start the local SecantusDB server unless it runs (or an external URI is set); returns the URI.

    Reuses the recorded port so clients holding the URI reconnect after a restart.
    """
    directory = directory.resolve()
    config = load_config(directory)
    if config is not None and not config.managed:
        return config.uri
    home = server_dir(directory)
    data_dir = home / "data"
    if config is not None and _server_process(config, data_dir) is not None:
        return config.uri
    port = config.port if config is not None and config.port else None
    if port is None or is_listening(HOST, port):
        port = free_port(HOST)
    uri = f"mongodb://{HOST}:{port}/?replicaSet={REPLICA_SET}"

    user = service_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    # An explicit (empty) config file: SecantusDB otherwise picks up any ./secantusd.toml it finds.
    toml = home / "secantusd.toml"
    if not toml.exists():
        toml.write_text("# written by buildsmart: all settings are on the command line\n")
    log_path = home / "secantusd.log"
    user.chown(home)
    cmd = [
        sys.executable, "-c", _LAUNCHER, "--config", str(toml), "--host", HOST, "--port", str(port),
        "--storage-path", str(data_dir), "--log-level", "WARNING",
        # Majority-acknowledged writes must survive a crash of the server: fsync at commit.
        "--sync-on-commit",
    ]  # fmt: skip
    extra: dict[str, object] = {} if user.is_current else {"user": user.uid, "group": user.gid, "extra_groups": []}
    with logfiles.open_private(log_path) as log_fh:
        try:
            proc = subprocess.Popen(  # type: ignore[call-overload]
                cmd, cwd=home, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, start_new_session=True, **extra
            )
        except OSError as exc:
            raise NodeError(f"cannot start SecantusDB: {exc}") from exc
    _save_config(directory, MongoConfig(uri=uri, port=port, pid=proc.pid))
    try:
        _wait_ready(uri, proc, log_path)
    except NodeError:
        _terminate(proc.pid, STOP_TIMEOUT_S)
        raise
    log.info("started SecantusDB (pid %d) on %s:%d, data in %s", proc.pid, HOST, port, data_dir)
    return uri


def _terminate(pid: int, timeout: float) -> None:
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            log.warning("SecantusDB (pid %d) still running %.0f s after SIGTERM: killing it", pid, timeout)
            proc.kill()
            proc.wait(10)
    except psutil.NoSuchProcess:
        return


def stop(directory: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the local server by its recorded PID; True if one was running. External URIs: no-op."""
    directory = directory.resolve()
    config = load_config(directory)
    if config is None or not config.managed:
        return False
    proc = _server_process(config, server_dir(directory) / "data")
    if proc is None:
        return False
    started = time.monotonic()
    _terminate(proc.pid, timeout)
    _save_config(directory, replace(config, pid=None))
    log.info("stopped SecantusDB (pid %d) in %.1f s", proc.pid, time.monotonic() - started)
    return True

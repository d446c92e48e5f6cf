"""Running ``buildsmart serve``: in the foreground (uvicorn in this process) or as a daemon of the
cluster directory that ``up --serve`` starts and ``down`` stops, by its PID file like the task runner.

Why a PID file in DIR and not a service: a local cluster's ``down`` must leave no process behind;
on a multi-host cluster ``serve`` runs wherever the user starts it, under their service manager,
in the foreground.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.exceptions import NodeError
from orchestrator.runtime import identity, procs

log = logging.getLogger(__name__)

MARKER = "orchestrator.serve"
PID_FILE = "serve.pid"
LOG_FILE = "serve.log"
ADDRESS_FILE = "serve.json"  # where the daemon listens, for `status` and tests
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
START_TIMEOUT_S = 60.0


def run(directory: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, status_interval: float = 2.0) -> None:
    """Serve in this process until SIGINT/SIGTERM (uvicorn handles both)."""
    import uvicorn

    from orchestrator.serve.app import ServeOptions, create_app

    app = create_app(ServeOptions(directory.resolve(), status_interval=status_interval))
    log.info("buildsmart serve listening on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")


def _running(directory: Path) -> identity.Verified | None:
    """The server of this directory, verified (exe, ``-m orchestrator.serve DIR``, start time)."""
    return procs.module_daemon(directory / PID_FILE, MARKER, directory, "buildsmart serve")


def daemon_pid(directory: Path) -> int | None:
    v = _running(directory.resolve())
    return v.pid if v else None


def address(directory: Path) -> str | None:
    """The daemon's base URL, or None when none runs."""
    directory = directory.resolve()
    if daemon_pid(directory) is None:
        return None
    try:
        data = json.loads((directory / ADDRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return f"http://{data['host']}:{data['port']}"


def start_daemon(directory: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Start the server of DIR unless it runs, wait until it answers; returns its PID."""
    directory = directory.resolve()
    pid = daemon_pid(directory)
    if pid is not None:
        return pid
    pid = procs.spawn(procs.python_module(MARKER, str(directory), host, str(port)), directory / PID_FILE, directory / LOG_FILE)
    (directory / ADDRESS_FILE).write_text(json.dumps({"host": host, "port": port}))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api/about"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        # plain liveness here: just after the fork the child does not carry its own command line yet
        if not identity.alive(pid):
            raise NodeError(f"buildsmart serve exited at start: {_log_tail(directory)}; see {directory / LOG_FILE}")
        try:
            urllib.request.urlopen(url, timeout=2)
        except urllib.error.HTTPError:
            break  # 401: it answers
        except OSError:
            time.sleep(0.2)
            continue
        break
    else:
        procs.stop(_running(directory), 10)
        raise NodeError(
            f"buildsmart serve did not answer on port {port} within {START_TIMEOUT_S:.0f} s; see {directory / LOG_FILE}"
        )
    log.info("started buildsmart serve for %s on %s:%d (pid %d)", directory, host, port, pid)
    return pid


def _log_tail(directory: Path, lines: int = 3) -> str:
    """The last lines of the server's log, for an error message (why it stopped)."""
    try:
        tail = (directory / LOG_FILE).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no log"
    return " | ".join(tail) or "empty log"


def stop_daemon(directory: Path, timeout_s: float = 30.0) -> int | None:
    """Stop the server of DIR by its PID; its PID, or None when none ran."""
    directory = directory.resolve()
    v = _running(directory)
    if v is None:
        return None
    procs.stop(v, timeout_s)
    log.info("stopped buildsmart serve of %s (pid %d)", directory, v.pid)
    return v.pid


def main(argv: list[str]) -> int:
    from orchestrator.cli.app import setup_logging

    directory = Path(argv[0]).resolve()
    setup_logging(directory)
    logging.getLogger().handlers[0].setLevel(logging.INFO)  # stderr is DIR/serve.log for the daemon
    run(directory, argv[1], int(argv[2]))
    return 0

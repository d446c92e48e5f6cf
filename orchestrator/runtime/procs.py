"""Starting the long-lived children of the local runtime and the host agent (Patroni, etcd, the
supervisor, the task runner) the same safe way, and stopping them by verified identity only.

* Python children run as ``python -I -m MODULE`` from ``/``: isolated mode ignores PYTHON*
  variables and does not put the current directory on ``sys.path``, so a file named like one of
  our modules in whatever directory root ran the CLI from cannot be imported in its place
  (module hijack of a root process).
* Each child's pid file records its PID and start time (runtime/identity.py), and every stop
  goes through identity verification: a reused PID is never signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import logfiles
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import identity

log = logging.getLogger(__name__)


def python_module(module: str, *args: str, python: str | None = None) -> list[str]:
    """argv that runs ``module`` isolated (no cwd on sys.path, no PYTHON* environment)."""
    return [python or sys.executable, "-I", "-m", module, *args]


def spawn(
    argv: Sequence[str],
    pid_file: Path,
    log_file: Path,
    user: ServiceUser | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start a daemon child in its own session (a Ctrl-C of the CLI must not reach it), from ``/``,
    appending to ``log_file`` (mode 0600: it may hold statements), and record it in ``pid_file``."""
    extra: dict[str, Any] = {}
    if user is not None and not user.is_current:
        extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
        env = user.environment(env)
    with logfiles.open_private(log_file) as logfh:
        if user is not None and not user.is_current:
            os.fchown(logfh.fileno(), user.uid, user.gid)
        proc = subprocess.Popen(
            list(argv), stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd="/", env=env, **extra,
        )  # fmt: skip
    identity.write_pid_file(pid_file, proc.pid)
    return proc.pid


def running(pid_file: Path, executable: str | Path, arguments: Sequence[Sequence[str]], what: str) -> identity.Verified | None:
    """The verified child recorded in ``pid_file``, or None."""
    return identity.child(pid_file, executable, arguments, what)


def module_daemon(pid_file: Path, module: str, directory: Path, what: str) -> identity.Verified | None:
    """A daemon we started with :func:`python_module` for a cluster directory, verified: this
    interpreter, ``-m MODULE`` and ``DIR`` in its arguments, the start time in ``pid_file``."""
    return running(pid_file, sys.executable, [("-m", module), (str(directory),)], what)


def stop(v: identity.Verified | None, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Stop a verified child (SIGKILL after ``timeout_s``); False when there was none."""
    return v is not None and identity.stop(v, timeout_s, sig)

"""Processes the local runtime started: liveness by PID and stop by PID (never by name).

A PID alone can be reused by an unrelated process, so callers pass what the command line must
contain; a zombie counts as dead (a killed child of ours stays a zombie until someone reaps it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError, PermissionError):
        return None


def write_pid(path: Path, pid: int) -> None:
    path.write_text(f"{pid}\n")


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int | None, cmdline_contains: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, its command line contains the marker."""
    if pid is None or pid <= 0:
        return False
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if cmdline_contains is not None:
            return any(cmdline_contains in part for part in proc.cmdline())
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def stop_pid(pid: int, what: str, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Signal ``pid``, wait for it to exit, SIGKILL it after ``timeout_s``. True when it was running."""
    if not alive(pid):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    if wait_gone(pid, timeout_s):
        log.info("stopped %s (pid %d)", what, pid)
        return True
    log.warning("%s (pid %d) did not exit within %.0f s after signal %d; killing it", what, pid, timeout_s, sig)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    wait_gone(pid, 10.0)
    return True

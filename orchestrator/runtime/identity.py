"""Process identity: the one place that decides whether a PID is the process we mean, before any
signal. The local failover supervisor, the per-host agent, ``down`` and ``node remove`` all use it.

A PID names a process only while that process lives; afterwards the kernel may hand the number to
anything else. A pid file (ours, or PostgreSQL's ``postmaster.pid``) therefore proves nothing by
itself. Before a signal we check three facts against what the pid file and our own records say:

* the executable (``/proc/PID/exe``, resolved) is the one we started (postgres, Patroni's Python, etcd);
* the command line holds the exact argument that names *this* member: ``-D DATA_DIR``, the Patroni
  config path, etcd's ``--data-dir``; whole arguments, never a substring (a Patroni liveness check
  that matched any command line containing ``patroni.yml`` would believe an editor is Patroni);
* the start time: postmaster.pid records the postmaster's start (line 3), our own pid files record
  the child's start time next to its PID. A process that started at another time is someone else.

Only a verified process is signalled, and only through the psutil handle made while verifying:
psutil compares the start time again and refuses to signal a PID reused in between. Nothing
unverified is ever sent SIGKILL. :func:`judge` is the pure decision, unit-tested without processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# postmaster.pid stores whole seconds; psutil reads the start in clock ticks: allow for both.
START_TOLERANCE_S = 2.0


@dataclass(frozen=True)
class Expected:
    """What the process named by a pid file must be."""

    what: str  # for messages: "postmaster of w1-0"
    executables: frozenset[str]  # resolved paths accepted for /proc/PID/exe
    arguments: tuple[tuple[str, ...], ...]  # each: consecutive argv items that must appear
    started_at: float | None  # epoch seconds recorded with the PID (None: an old pid file without it)


@dataclass(frozen=True)
class Observed:
    """What /proc says about a PID (a frozen snapshot, so :func:`judge` stays pure)."""

    pid: int
    exe: str | None
    cmdline: tuple[str, ...]
    create_time: float
    zombie: bool


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def _contains(argv: Sequence[str], seq: Sequence[str]) -> bool:
    n = len(seq)
    return any(tuple(argv[i : i + n]) == tuple(seq) for i in range(len(argv) - n + 1))


def judge(observed: Observed | None, expected: Expected) -> Verdict:
    """Is ``observed`` the process ``expected`` describes? Pure."""
    if observed is None:
        return Verdict(False, f"{expected.what}: no such process")
    if observed.zombie:
        return Verdict(False, f"{expected.what}: pid {observed.pid} has exited (zombie)")
    if observed.exe is None or observed.exe not in expected.executables:
        program = observed.exe or "an unknown program"
        return Verdict(False, f"{expected.what}: pid {observed.pid} runs {program}, not {sorted(expected.executables)}")
    for seq in expected.arguments:
        if not _contains(observed.cmdline, seq):
            return Verdict(False, f"{expected.what}: pid {observed.pid} lacks the argument {' '.join(seq)!r}")
    if expected.started_at is not None and abs(observed.create_time - expected.started_at) > START_TOLERANCE_S:
        return Verdict(
            False,
            f"{expected.what}: pid {observed.pid} started at {observed.create_time:.0f}, the pid file says "
            f"{expected.started_at:.0f}: the PID was reused",
        )
    return Verdict(True, f"{expected.what}: pid {observed.pid} verified")


def resolve(path: str | Path) -> str:
    return os.path.realpath(path)


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def observe(pid: int | None) -> tuple[Observed | None, psutil.Process | None]:
    if pid is None or pid <= 0:
        return None, None
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            try:
                exe: str | None = resolve(proc.exe()) if proc.exe() else None
            except (psutil.AccessDenied, FileNotFoundError):
                exe = None
            snap = Observed(pid, exe, tuple(proc.cmdline()), proc.create_time(), proc.status() == psutil.STATUS_ZOMBIE)
        return snap, proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, None


@dataclass(frozen=True)
class Verified:
    """A process checked against its Expected; signals go through ``proc`` only."""

    pid: int
    what: str
    proc: psutil.Process


def verify(pid: int | None, expected: Expected) -> Verified | None:
    snap, proc = observe(pid)
    verdict = judge(snap, expected)
    if not verdict.ok:
        if snap is not None:  # a live process that is not ours: say so, it may be a stale pid file
            log.info("not signalling: %s", verdict.reason)
        return None
    assert proc is not None and pid is not None
    return Verified(pid, expected.what, proc)


def alive(pid: int | None) -> bool:
    """Plain liveness of a PID (not a zombie); for tests and waits, never a reason to signal."""
    snap, _ = observe(pid)
    return snap is not None and not snap.zombie


def _gone(v: Verified) -> bool:
    _reap(v.pid)
    try:
        return not v.proc.is_running() or v.proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(v: Verified, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(v):
            return True
        time.sleep(0.02)
    return _gone(v)


def send(v: Verified, sig: int) -> bool:
    """Signal a verified process; False when it is gone (or its PID now names another process)."""
    try:
        v.proc.send_signal(sig)  # psutil re-checks the start time: a reused PID raises NoSuchProcess
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop(v: Verified, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Signal a verified process, wait, SIGKILL it (still the same, verified process) after ``timeout_s``."""
    if not send(v, sig):
        return False
    if wait_gone(v, timeout_s):
        log.info("stopped %s (pid %d)", v.what, v.pid)
        return True
    log.warning("%s (pid %d) did not exit within %.0f s after signal %d; killing it", v.what, v.pid, timeout_s, sig)
    send(v, signal.SIGKILL)
    wait_gone(v, 10.0)
    return True


# ---------------------------------------------------------------- pid files


def write_pid_file(path: Path, pid: int) -> None:
    """Record a child we started: its PID and its start time (``PID START``), atomically."""
    started = psutil.Process(pid).create_time()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid} {started:.3f}\n")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> tuple[int | None, float | None]:
    """(pid, start time) from one of our pid files; an old file holds the PID alone."""
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
        return pid, (float(parts[1]) if len(parts) > 1 else None)
    except (FileNotFoundError, IndexError, ValueError, PermissionError):
        return None, None


def read_postmaster_pid(data_dir: Path) -> tuple[int | None, float | None, str | None]:
    """(pid, start time, data directory) from PostgreSQL's postmaster.pid (lines 1-3)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[0].strip()), float(lines[2].strip()), lines[1].strip()
    except (FileNotFoundError, IndexError, ValueError, PermissionError):
        return None, None, None


def postmaster(data_dir: Path, postgres_binaries: Sequence[str | Path], what: str) -> Verified | None:
    """The running postmaster of ``data_dir``, verified (exe is one of ``postgres_binaries``,
    ``-D DATA_DIR`` on its command line, started when postmaster.pid says), or None."""
    pid, started, recorded_dir = read_postmaster_pid(data_dir)
    if pid is None:
        return None
    if recorded_dir is not None and resolve(recorded_dir) != resolve(data_dir):
        log.info("not signalling: %s: postmaster.pid names data directory %s", what, recorded_dir)
        return None
    snap, _ = observe(pid)
    # Patroni and pg_ctl pass -D as given; accept the resolved and the literal path.
    dirs = {str(data_dir), resolve(data_dir)}
    arg = next((("-D", d) for d in dirs if snap is not None and _contains(snap.cmdline, ("-D", d))), ("-D", str(data_dir)))
    expected = Expected(what, frozenset(resolve(b) for b in postgres_binaries), (arg,), started)
    return verify(pid, expected)


def child(pid_file: Path, executable: str | Path, arguments: Sequence[Sequence[str]], what: str) -> Verified | None:
    """A child we started and recorded in ``pid_file``, verified, or None."""
    pid, started = read_pid_file(pid_file)
    if pid is None:
        return None
    return verify(pid, Expected(what, frozenset({resolve(executable)}), tuple(tuple(a) for a in arguments), started))

"""The task runner daemon: elected once per cluster, runs periodic tasks one at a time.

Election: the runner holds a session advisory lock on the coordinator primary on a connection of
its own. Only one session in the cluster can hold it, so on multi-host clusters (a runner per
orchestrator host, e.g. under systemd) exactly one runs tasks and the others wait. When that
connection breaks (the primary failed over, or the network went), the lock is gone with it: every
runner reconnects (the connection string lists every member with target_session_attrs =
read-write, so it lands on the new primary) and tries again. The leader checks its lock session
before every task run, so it stops acting within a second of losing it. While elected, it also
keeps each worker's foreign server led by the worker's primary on a multi-host cluster
(fdwroute.py), in a thread that no long task holds up.

Stopping: SIGTERM ends the loop between tasks; during a task it interrupts the task at once. Long
operations are jobs (buildsmart.jobs), so an interrupted move or split is resumed by the next run
of the balancer, exactly as after a kill -9.

``start_daemon``/``stop_daemon`` manage the local daemon of DIR by PID (DIR/tasks.pid), checking
that the PID still belongs to a runner of DIR before signalling it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psycopg

from orchestrator import catalog, fdwroute, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.elastic.context import Elastic
from orchestrator.exceptions import BuildSmartError
from orchestrator.nodeconn import NodeConnections
from orchestrator.runtime import identity, procs
from orchestrator.tasks.registry import PeriodicTask, TaskContext, TaskOutcome, create_all

log = logging.getLogger(__name__)

MARKER = "orchestrator.tasks"
PID_FILE = "tasks.pid"
LOG_FILE = "tasks.log"
# Advisory lock "runs the cluster's periodic tasks" (fragment locks use 1112755524, job runs
# 1112755525, first-load layout 1112755527).
ELECTION_LOCK = 1112755526
ELECTION_RETRY_S = 2.0
LEADER_CHECK_S = 1.0
FAILURE_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 30.0


class RunnerStopping(BaseException):
    """Raised into a running task by SIGTERM: unwinds it; its job stays for the next run."""


@dataclass
class _Due:
    task: PeriodicTask
    at: float


class TaskRunner:
    def __init__(self, directory: Path, tasks: list[PeriodicTask] | None = None) -> None:
        self.directory = directory.resolve()
        self.tasks = tasks if tasks is not None else create_all()
        self.stopping = False
        self.busy = False
        self._lock_conn: psycopg.Connection | None = None
        self._follower: fdwroute.Follower | None = None  # multi-host: foreign servers led by primaries
        self._nodes: NodeConnections | None = None
        self._topo_mtime = 0.0
        self._waiting_logged = False
        now = time.monotonic()
        self._due = {t.name: _Due(t, now) for t in self.tasks}

    # -- election -----------------------------------------------------------------------------

    def _coordinator(self) -> tuple[topology.Topology, topology.Credentials]:
        return topology.load(self.directory), topology.load_credentials(self.directory)

    def is_leader(self) -> bool:
        """Holds the election lock (checked on its session)."""
        conn = self._lock_conn
        if conn is None:
            return False
        try:
            row = conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() "
                "AND classid = %s AND objid = 0 AND granted",
                (ELECTION_LOCK,),
            ).fetchone()
            if row and row[0]:
                return True
        except psycopg.Error as exc:
            log.info("task runner: lost its coordinator session (%s); re-electing", str(exc).strip().splitlines()[0])
        self._resign()
        return False

    def elect(self) -> bool:
        if self.is_leader():
            return True
        try:
            topo, creds = self._coordinator()
            conn = connect(superuser_target(topo.coordinator, creds), f"tasks:{catalog.runner_identity()}", autocommit=True)
        except BuildSmartError as exc:
            if not self._waiting_logged:
                log.info("task runner: coordinator unreachable (%s); retrying", str(exc).splitlines()[0])
                self._waiting_logged = True
            return False
        try:
            row = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, 0)", (ELECTION_LOCK,)).fetchone()
        except psycopg.Error:
            conn.close()
            return False
        if not (row and row[0]):
            conn.close()
            if not self._waiting_logged:
                log.info("task runner: another runner leads this cluster; standing by")
                self._waiting_logged = True
            return False
        self._lock_conn = conn
        self._waiting_logged = False
        self._follower = fdwroute.Follower(self.directory).start()
        log.info("task runner %s elected: running %s", catalog.runner_identity(), ", ".join(t.name for t in self.tasks))
        return True

    def _resign(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                self._lock_conn.close()
            self._lock_conn = None
        self._reset_nodes()

    # -- running tasks ------------------------------------------------------------------------

    def _reset_nodes(self) -> None:
        if self._nodes is not None:
            with contextlib.suppress(Exception):
                self._nodes.close()
            self._nodes = None

    def _context(self) -> TaskContext:
        mtime = (self.directory / topology.TOPOLOGY_FILE).stat().st_mtime
        if self._nodes is None or mtime != self._topo_mtime:  # a node was added or removed
            self._reset_nodes()
            topo, creds = self._coordinator()
            self._nodes = NodeConnections(topo, creds, "tasks")
            self._topo_mtime = mtime
        el = Elastic(self.directory, self._nodes.topology, self._nodes.creds, self._nodes)
        return TaskContext(self.directory, el, lambda: self.stopping)

    def run_task(self, task: PeriodicTask) -> TaskOutcome:
        """One run of one task, recorded in buildsmart.task_runs; never raises BuildSmart or
        database errors (they are logged and the task backs off)."""
        ctx = self._context()
        coord = ctx.el.coord
        started = time.monotonic()
        try:
            catalog.task_started(coord, task.name)
            self.busy = True
            try:
                outcome = task.run(ctx)
            finally:
                self.busy = False
            catalog.task_finished(coord, task.name, True, outcome.summary)
            self._due[task.name].at = time.monotonic() + (task.again_s() if outcome.acted else task.interval_s(ctx))
            if outcome.acted:
                log.info("task %s: %s (%.1f s)", task.name, outcome.summary, time.monotonic() - started)
            return outcome
        except (BuildSmartError, psycopg.Error) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("task %s failed: %s; next try in %.0f s", task.name, message, FAILURE_BACKOFF_S)
            self._reset_nodes()  # connections may be broken (failover): reconnect next time
            with contextlib.suppress(BuildSmartError, psycopg.Error):
                ctx2 = self._context()
                catalog.task_finished(ctx2.el.coord, task.name, False, message)
            self._due[task.name].at = time.monotonic() + FAILURE_BACKOFF_S
            return TaskOutcome(f"failed: {message}")

    def step(self) -> bool:
        """Run the most overdue task if one is due; False when none was (the caller sleeps)."""
        due = min(self._due.values(), key=lambda d: d.at)
        if due.at > time.monotonic():
            return False
        self.run_task(due.task)
        return True

    def run(self) -> None:
        log.info("task runner for %s started (pid file %s)", self.directory, self.directory / PID_FILE)
        while not self.stopping:
            if not topology.exists(self.directory):
                log.info("%s is gone; task runner exits", self.directory)
                break
            if not self.elect():
                self._sleep(ELECTION_RETRY_S)
                continue
            if not self.step():
                nxt = min(d.at for d in self._due.values()) - time.monotonic()
                self._sleep(max(0.05, min(nxt, LEADER_CHECK_S)))
        self._resign()
        log.info("task runner stopped")

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < until:
            time.sleep(min(0.1, until - time.monotonic()))

    def on_term(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.busy:
            raise RunnerStopping


# ---------------------------------------------------------------- daemon management


def _running(directory: Path) -> identity.Verified | None:
    """The task runner of this directory, verified (exe, ``-m orchestrator.tasks DIR``, start time)."""
    return procs.module_daemon(directory / PID_FILE, MARKER, directory, "task runner")


def daemon_pid(directory: Path) -> int | None:
    v = _running(directory.resolve())
    return v.pid if v else None


def start_daemon(directory: Path) -> int:
    """Start the runner of DIR unless it runs; returns its PID."""
    directory = directory.resolve()
    pid = daemon_pid(directory)
    if pid is not None:
        return pid
    pid = procs.spawn(procs.python_module(MARKER, str(directory)), directory / PID_FILE, directory / LOG_FILE)
    log.info("started the task runner for %s (pid %d)", directory, pid)
    return pid


def stop_daemon(directory: Path, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the runner of DIR (verified; SIGTERM, SIGKILL after ``timeout_s``); its PID, or None
    when none ran."""
    directory = directory.resolve()
    v = _running(directory)
    if v is None:
        return None
    procs.stop(v, timeout_s)
    log.info("stopped the task runner of %s (pid %d)", directory, v.pid)
    return v.pid


def main(argv: list[str]) -> int:
    from orchestrator.cli.app import setup_logging

    directory = Path(argv[0]).resolve()
    setup_logging(directory)
    logging.getLogger().handlers[0].setLevel(logging.INFO)  # stderr (DIR/tasks.log for the daemon) too
    runner = TaskRunner(directory)
    signal.signal(signal.SIGTERM, runner.on_term)
    signal.signal(signal.SIGINT, runner.on_term)
    try:
        runner.run()
    except RunnerStopping:
        log.info("task runner interrupted during a task; its job (if any) is resumed by the next run")
    return 0

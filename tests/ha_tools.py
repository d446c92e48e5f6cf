"""Load and fault tools for the HA tests and bench/failover.py: a retrying writer through the
coordinator (idempotent keys: a reading written twice replaces itself), kill -9 by PID, and lookups
of who leads a group."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from orchestrator import cluster, topology
from orchestrator.connections import app_target
from orchestrator.osuser import service_user
from orchestrator.runtime import ha, hasettings
from orchestrator.runtime.patroni import PatroniMember

BASE_TS = "2026-01-01 00:00:00+00"


@dataclass
class Attempt:
    batch: int
    started: float
    finished: float
    ok: bool
    error: str | None = None


@dataclass
class Writer:
    """Inserts batch after batch of ``rows`` readings through the coordinator; a failed batch is
    retried on a new connection until it commits. Key of row i of batch b: (prefix+b%buildings, 'm', BASE+b*rows+i s)."""

    directory: Path
    prefix: str
    rows: int = 200
    buildings: int = 4
    max_batches: int = 10**9
    pause_s: float = 0.0
    # a batch not acknowledged within this is abandoned with its connection and retried (None: wait).
    # A frozen host's kernel still acknowledges TCP, so the coordinator's session on it waits until
    # the host thaws; only the client's own deadline gets it going (docs/hosts.md).
    attempt_s: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    acked: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, name=f"writer-{self.prefix}", daemon=True)
        self.thread.start()
        return self

    def finish(self, timeout_s: float = 120.0) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "writer did not finish"

    def _conninfo(self) -> str:
        topo = topology.load(self.directory)
        return app_target(topo.coordinator, topology.load_credentials(self.directory)).conninfo("ha-writer")

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        batch = 0
        while batch < self.max_batches and not self.stop.is_set():
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._conninfo(), connect_timeout=3)
                if not self._insert(conn, batch):
                    # abandoned, not closed (its thread still uses it): if it commits later, the
                    # retry wrote the same keys and replaces it
                    self.attempts.append(Attempt(batch, started, time.monotonic(), False, f"no answer in {self.attempt_s} s"))
                    conn = None
                    continue
                self.attempts.append(Attempt(batch, started, time.monotonic(), True))
                batch += 1
                self.acked = batch
                if self.pause_s:
                    time.sleep(self.pause_s)
            except psycopg.Error as exc:
                self.attempts.append(Attempt(batch, started, time.monotonic(), False, str(exc).splitlines()[0]))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def _insert(self, conn: psycopg.Connection, batch: int) -> bool:
        """One batch in one transaction; False when abandoned after ``attempt_s``."""

        def insert() -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO public.readings (building, meter, ts, kwh) "
                    "SELECT %s, 'm', %s::timestamptz + make_interval(secs => %s + i), i FROM generate_series(0, %s - 1) i",
                    (f"{self.prefix}{batch % self.buildings}", BASE_TS, batch * self.rows, self.rows),
                )

        if self.attempt_s is None:
            insert()
            return True
        failure: list[psycopg.Error] = []

        def attempt() -> None:
            try:
                insert()
            except psycopg.Error as exc:
                failure.append(exc)

        worker = threading.Thread(target=attempt, name=f"writer-{self.prefix}-{batch}", daemon=True)
        worker.start()
        worker.join(self.attempt_s)
        if worker.is_alive():
            return False
        if failure:
            raise failure[0]
        return True

    def recovery_after(self, t0: float) -> float | None:
        """Seconds from ``t0`` to the end of the first successful batch begun after it."""
        for a in self.attempts:
            if a.ok and a.started >= t0:
                return a.finished - t0
        return None

    def max_pause_after(self, t0: float) -> float:
        """Longest interval without a successful commit, from ``t0`` on (the write pause a fault caused)."""
        ends = [t0] + [a.finished for a in self.attempts if a.ok and a.finished >= t0]
        return max((b - a for a, b in itertools.pairwise(ends)), default=0.0)

    def failures_after(self, t0: float) -> list[Attempt]:
        return [a for a in self.attempts if not a.ok and a.finished >= t0]

    def wait_acked(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acked < n:
            assert time.monotonic() < deadline, f"writer acknowledged only {self.acked} batches"
            time.sleep(0.05)


def count_rows(conn: psycopg.Connection, prefix: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*), count(DISTINCT (building, meter, ts)) FROM public.readings WHERE building LIKE %s", (prefix + "%",)
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def members(directory: Path) -> dict[str, PatroniMember]:
    topo = topology.load(directory)
    user = service_user(topo.service_user)
    return {lm.name: PatroniMember(g, lm) for g, lm in cluster.local_members(directory, topo, user)}


def leader(directory: Path, group: str) -> str:
    topo = topology.load(directory)
    name = ha.leader_of(topo, topo.group(group), hasettings.load(directory))
    assert name is not None, f"group {group} has no leader"
    return name


def wait_leader(directory: Path, group: str, not_member: str | None = None, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            name = leader(directory, group)
            if name != not_member:
                return name
        except AssertionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"group {group} has no new leader after {timeout_s} s")


def kill9(pm: PatroniMember, patroni: bool = True, postgres: bool = True) -> float:
    """SIGKILL the member's Patroni and/or postmaster by PID; returns the monotonic time of the kill."""
    pids = []
    if postgres:
        pids.append(pm.postmaster_pid())
    if patroni:
        pids.append(pm.patroni_pid())
    t0 = time.monotonic()
    for pid in pids:
        assert pid is not None, f"{pm.name}: process to kill is not running"
        os.kill(pid, signal.SIGKILL)
    return t0


def wait_member_state(directory: Path, member: str, role: str, timeout_s: float = 60.0) -> None:
    """Wait until Patroni reports ``member`` running in ``role`` ('replica' streaming, or 'primary')."""
    settings = hasettings.load(directory)
    deadline = time.monotonic() + timeout_s
    state: dict[str, object] = {}
    while time.monotonic() < deadline:
        state = ha.member_state(settings, member)
        if role == "replica" and state.get("role") == "replica" and state.get("replication_state") == "streaming":
            return
        if role == "primary" and state.get("role") == "primary" and state.get("state") == "running":
            return
        time.sleep(0.2)
    raise AssertionError(f"{member} is not a running {role} after {timeout_s} s: {state}")


def worker_of(directory: Path, building: str) -> str:
    """The worker group holding the fragment of ``building``."""
    from orchestrator import catalog
    from orchestrator.connections import connect, superuser_target
    from orchestrator.fragments import Router

    topo = topology.load(directory)
    with connect(
        superuser_target(topo.coordinator, topology.load_credentials(directory)), "ha-test", autocommit=True, search_path=None
    ) as conn:
        frags = catalog.load_fragments(conn)
    return Router(frags).route(building).node


def wait_healthy(directory: Path, timeout_s: float = 90.0) -> None:
    """Every group: one running leader, every other member streaming, a synchronous standby when sync is on."""
    topo = topology.load(directory)
    settings = hasettings.load(directory)
    deadline = time.monotonic() + timeout_s
    bad: list[str] = []
    while time.monotonic() < deadline:
        bad = []
        for group in topo.groups:
            status = ha.members_status(settings, group)
            roles = sorted(str(m["role"]) for m in status)
            if roles.count("leader") != 1 or any(m["role"] != "leader" and m["state"] != "streaming" for m in status):
                bad.append(f"{group.name}: {[(m['name'], m['role'], m['state']) for m in status]}")
            elif settings.synchronous != "off" and len(status) > 1 and "sync_standby" not in roles:
                bad.append(f"{group.name}: no sync standby yet")
        if not bad:
            return
        time.sleep(0.3)
    raise AssertionError(f"cluster not healthy after {timeout_s} s: {bad}")

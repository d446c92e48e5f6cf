"""A Patroni group across hosts (network namespaces), TLS everywhere, faulted under a writer
(issue 13 items 3, 4 and 7 for one group): etcd on three hosts, the primary on h1 and its
synchronous replica on h2. While a writer records every acknowledged insert, the primary's host
is cut off (it also loses its etcd member: a minority), crashes (every process killed) or freezes
(every process stopped). The replica is promoted once the primary's lease expires, writes resume
by themselves, and after the heal, restart or thaw the old primary rejoins as a replica by
itself. Every acknowledged row is present exactly once on both members, and no row was
acknowledged by the old primary after the fault (synchronous replication: it cannot commit
alone)."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from orchestrator.osuser import service_user
from tests import netns
from tests.harness import make_tmp_dir
from tests.hosts_tools import PG_PORT, REST_PORT, EtcdHosts, HostCa, start_patroni

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

HOSTS = ("h1", "h2", "h3")
SUPERUSER = ("buildsmart_admin", "hosts-test-secret")
REST = ("buildsmart", "rest-secret")


@dataclass
class Group:
    net: netns.Network
    ca: HostCa
    etcd: EtcdHosts
    members: dict[str, str] = field(default_factory=dict)  # member -> host

    def rest(self, member: str, path: str) -> tuple[int, dict[str, object]]:
        url = f"https://{self.net.address(self.members[member])}:{REST_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2, context=self.ca.context) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def conninfo(self, member: str | None = None) -> str:
        hosts = [self.members[member]] if member else list(self.members.values())
        addrs = ",".join(self.net.address(h) for h in hosts)
        ports = ",".join(str(PG_PORT) for _ in hosts)
        return (
            f"host={addrs} port={ports} dbname=postgres user={SUPERUSER[0]} password={SUPERUSER[1]} "
            f"sslmode=verify-full sslrootcert={self.ca.ca} sslcertmode=disable connect_timeout=2 "
            # a cut-off server never answers: without these a client waits on its socket forever
            "tcp_user_timeout=3000 keepalives_idle=2 keepalives_interval=1 keepalives_count=2"
            + ("" if member else " target_session_attrs=read-write")
        )

    def wait(self, what: str, check: object, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if callable(check) and check():
                return time.monotonic() - started
            time.sleep(0.2)
        logs = {m: (self.etcd.members[0].directory.parent / m / "patroni.log").read_text()[-1500:] for m in self.members}
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {logs}")


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    net = netns.Network(HOSTS)
    base = make_tmp_dir("bs-hosts-")
    user = service_user()
    try:
        ca = HostCa(base, user)
        e = EtcdHosts(net, base, ca, HOSTS)
        e.wait_healthy()
        g = Group(net, ca, e, {"w1-0": "h1", "w1-1": "h2"})
        args = (ca, e, user, SUPERUSER, REST, net.subnet)
        start_patroni(net, "h1", "w1-0", "w1", base, *args)
        g.wait("w1-0 to lead", lambda: g.rest("w1-0", "/primary")[0] == 200, 90)
        start_patroni(net, "h2", "w1-1", "w1", base, *args)
        g.wait("w1-1 to stream as synchronous standby", lambda: g.rest("w1-1", "/sync")[0] == 200, 120)
        yield g
    finally:
        net.close()
        left = net.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"the harness left {left}"


class Writer(threading.Thread):
    """Inserts one row per attempt through a multi-host, read-write conninfo and records what the
    server acknowledged, and when. An attempt that gets no answer within ATTEMPT_S is abandoned
    with its connection (a frozen host's kernel still acknowledges TCP, so no socket timeout
    fires); if that server answers later, its acknowledgement still counts."""

    ATTEMPT_S = 3.0

    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.acked: list[tuple[int, float]] = []
        self.by_host: dict[int, str] = {}  # row -> address of the server that acknowledged it
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _attempt(self, conn: psycopg.Connection, row: int, failed: threading.Event) -> None:
        try:
            conn.execute("INSERT INTO acks (id) VALUES (%s)", (row,))
            with self.lock:
                self.acked.append((row, time.monotonic()))
                self.by_host[row] = conn.info.host
        except psycopg.Error:
            failed.set()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        row = 0
        while not self.stop.is_set():
            row += 1
            try:
                if conn is None:
                    conn = psycopg.connect(self.conninfo, autocommit=True)
            except psycopg.Error:
                time.sleep(0.1)
                continue
            failed = threading.Event()
            attempt = threading.Thread(target=self._attempt, args=(conn, row, failed), daemon=True)
            attempt.start()
            attempt.join(self.ATTEMPT_S)
            if attempt.is_alive() or failed.is_set():
                conn = None  # abandoned (or broken): the next attempt connects afresh
                time.sleep(0.1)
            time.sleep(0.01)


def _leader(group: Group) -> str:
    leaders = [m for m in group.members if group.rest(m, "/primary")[0] == 200]
    assert len(leaders) == 1, f"expected one primary, found {leaders}"
    return leaders[0]


def _scenario(group: Group, what: str, fault: Callable[[str], None], recover: Callable[[str], None]) -> None:
    """Fault the primary's host under a writer, recover it; check the promotion, the rejoin and
    every acknowledged row."""
    old_leader = _leader(group)
    new_leader = next(m for m in group.members if m != old_leader)
    host = group.members[old_leader]
    # only the synchronous standby may be promoted: a replica that rejoined a moment ago is not yet
    group.wait(f"{new_leader} to be the synchronous standby", lambda: group.rest(new_leader, "/sync")[0] == 200, 60)
    with psycopg.connect(group.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS acks (id bigint PRIMARY KEY)")
        conn.execute("TRUNCATE acks")
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        streams = conn.execute("SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)").fetchall()
        assert streams == [(True,)], f"the replica must stream over TLS: {streams}"
    writer = Writer(group.conninfo())
    writer.start()
    try:
        group.wait("first writes", lambda: len(writer.acked) > 20, 30)
        fault_at = time.monotonic()
        fault(host)
        try:
            group.wait(f"{new_leader} to be promoted", lambda: group.rest(new_leader, "/primary")[0] == 200, 60)
            new_host = group.net.address(group.members[new_leader])

            def resumed_at() -> float | None:
                with writer.lock:
                    return next((t for i, t in writer.acked if t > fault_at and writer.by_host[i] == new_host), None)

            group.wait("writes to resume on the new primary", lambda: resumed_at() is not None, 30)
            resumed = (resumed_at() or 0.0) - fault_at
        finally:
            recover(host)
        group.wait(f"{old_leader} to rejoin as a replica", lambda: group.rest(old_leader, "/replica")[0] == 200, 120)
        group.wait("more writes after the recovery", lambda: writer.acked[-1][1] > time.monotonic() - 1, 30)
    finally:
        writer.stop.set()
        writer.join(10)
    with writer.lock:
        acked = [i for i, _ in writer.acked]
    times = sorted(t for _, t in writer.acked)
    pause = max(b - a for a, b in itertools.pairwise(times))
    print(f"\n{what}: first acknowledged write {resumed:.1f} s after the fault, longest pause {pause:.1f} s")
    with psycopg.connect(group.conninfo(), autocommit=True) as conn:
        present = [r[0] for r in conn.execute("SELECT id FROM acks").fetchall()]
    assert len(present) == len(set(present))
    lost = sorted(set(acked) - set(present))
    assert not lost, f"{len(lost)} acknowledged rows lost: {lost[:10]}"
    old = group.conninfo(old_leader)

    def rejoined_with_every_row() -> bool:
        try:
            with psycopg.connect(old, autocommit=True) as c:
                rows = {r[0] for r in c.execute("SELECT id FROM acks").fetchall()}
                return set(acked) <= rows and c.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        except psycopg.Error:
            return False

    group.wait("the rejoined old primary to hold every acknowledged row", rejoined_with_every_row, 60)


def test_primary_host_cut_off_then_healed(group: Group) -> None:
    _scenario(group, "primary's host cut off", group.net.cut, group.net.heal)


def test_primary_host_crash_then_restart(group: Group) -> None:
    """kill -9 of every process of the primary's host (Patroni, postgres, its etcd member)."""
    _scenario(group, "primary's host crashed", group.net.crash, group.net.restart)


def test_frozen_primary_host_resumes_after_promotion(group: Group) -> None:
    """SIGSTOP of every process of the primary's host; it resumes after its replica was promoted
    and must not acknowledge anything on its old timeline."""
    _scenario(group, "primary's host frozen", group.net.freeze, group.net.thaw)

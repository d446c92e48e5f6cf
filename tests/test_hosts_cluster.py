"""A whole BuildSmartDB cluster over five hosts made of network namespaces (issue 13 item 6):
etcd on h1-h3; the coordinator group on h4+h5, worker w1 on h1+h2, worker w2 on h3+h4, each
member under Patroni with TLS everywhere, every host running its agent (runtime/agent.py),
which starts that host's members from its plan. The cluster is set up from the test's own
namespace (the bridge) with ``init_remote`` as for servers someone else runs: the coordinator
reaches the workers through postgres_fdw over TLS (verify-full) between hosts.

One cluster for every scenario (module fixture, torn down by PID and namespaces removed, also on
failure). Each scenario runs a writer inserting batches through the coordinator and counting
every acknowledged row; afterwards every acknowledged row is present exactly once:
* kill -9 of w1's primary (Patroni and postgres) with its host's agent alive: under a second or
  so (the agent releases the leader key);
* crash of the coordinator primary's host (every process killed), then restarted;
* the host of w2's primary cut off, then healed;
* an etcd-only minority: the etcd host without any primary cut off, then healed."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from orchestrator import cluster
from orchestrator.osuser import service_user
from orchestrator.spec import ClusterSpec
from orchestrator.topology import COORDINATOR, WORKER, Credentials, Group, Layout, Member, Topology
from tests import ha_tools, netns
from tests.harness import ClusterHandle, make_tmp_dir, write_csv
from tests.hosts_tools import SUPERUSER, HostCluster, HostGroup, kill_primary, leader, make_cluster

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

HOSTS = ("h1", "h2", "h3", "h4", "h5")
ETCD_ON = ("h1", "h2", "h3")
LAYOUT = {"coordinator": ("h4", "h5"), "w1": ("h1", "h2"), "w2": ("h3", "h4")}


@dataclass
class Whole:
    hosts: HostCluster
    handle: ClusterHandle

    def group(self, name: str) -> HostGroup:
        return self.hosts.groups[name]


def _topology(hc: HostCluster) -> Topology:
    def group(name: str, role: str) -> Group:
        g = hc.groups[name]
        members = tuple(Member(m, hc.net.address(h), g.pg_port) for m, h in g.members.items())
        return Group(name, role, members, managed=False)

    groups = (group("coordinator", COORDINATOR), group("w1", WORKER), group("w2", WORKER))
    return Topology("hosts5", groups, Layout(("m",)), runtime="external")


@pytest.fixture(scope="module")
def whole() -> Iterator[Whole]:
    net = netns.Network(HOSTS)
    base = make_tmp_dir("bs-hosts5-")
    try:
        hc = make_cluster(net, base, service_user(), ETCD_ON, LAYOUT)
        creds = Credentials(SUPERUSER[0], SUPERUSER[1], "buildsmart_app", uuid.uuid4().hex, ca_file=str(hc.ca.ca))
        directory = base / "state"
        cluster.init_remote(directory, ClusterSpec(_topology(hc), creds))
        yield Whole(hc, ClusterHandle(directory))
    finally:
        net.close()
        left = net.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"the harness left {left}"


def test_ingest_and_queries_through_the_coordinator_fdw_over_tls(whole: Whole, tmp_path: Path) -> None:
    rows = [("alpha", "el", "2023-01-01 00:00:00+00", 1.5), ("zulu", "el", "2023-01-01 00:00:00+00", 2.5)]
    whole.handle.run_cli("ingest", str(write_csv(tmp_path / "r.csv", rows)))
    coord = [m.host for m in whole.handle.topology.coordinator.members]
    with whole.handle.coordinator() as conn:  # open while the workers are checked: its FDW sessions live
        got = conn.execute("SELECT building, kwh FROM readings WHERE building IN ('alpha', 'zulu') ORDER BY 1").fetchall()
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT count(*) FROM readings").fetchall())
        assert got == [("alpha", 1.5), ("zulu", 2.5)]
        assert "BuildSmart Distributed" in plan and "Runs on: workers" in plan, plan
        # split point "m": fragment 1 (buildings < m) on w1, fragment 2 on w2
        for worker, fragment, building in (("w1", "readings_f1", "alpha"), ("w2", "readings_f2", "zulu")):
            with whole.handle.worker(worker) as wconn:
                stored = wconn.execute(sql.SQL("SELECT building FROM bsdata.{}").format(sql.Identifier(fragment))).fetchall()
                assert stored == [(building,)]
                # the coordinator's sessions on this worker (the query above) came over TLS from its hosts
                ssl = wconn.execute(
                    "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE host(a.client_addr) = ANY(%s)",
                    (coord,),
                ).fetchall()
                assert ssl and all(r == (True,) for r in ssl), ssl


# split point "m": buildings of w1 sort before it, of w2 after it; the coordinator holds none
PREFIX = {"w1": "a", "w2": "t", "coordinator": "t"}


def _scenario(
    whole: Whole, group: str, fault: Callable[[], tuple[str, float]], recover: Callable[[str], None]
) -> tuple[float, int]:
    """Writer through the coordinator, into buildings of ``group``'s rows (the coordinator: any);
    fault (returns the faulted host and the time of the fault); wait for writes to resume;
    recover; wait for the old primary to rejoin; every acknowledged row exactly once."""
    g = whole.group(group)
    directory = whole.handle.directory
    prefix = f"{PREFIX[group]}{uuid.uuid4().hex[:8]}_"
    old = leader(g)
    _wait_synchronous(whole)
    writer = ha_tools.Writer(directory, prefix, rows=100).start()
    try:
        writer.wait_acked(10, 60)
        host, t0 = fault()
        # a batch begun before the fault took effect may still commit: count from after it
        t1 = time.monotonic()
        try:
            g.wait(f"a new primary of {group}", lambda: _primary(g) not in (None, old), 90)
            deadline = time.monotonic() + 60
            while writer.recovery_after(t1) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            after = writer.recovery_after(t1)
            assert after is not None, f"writes did not resume within 60 s: {writer.failures_after(t1)[-3:]}"
            resumed = after + (t1 - t0)
        finally:
            recover(host)
        g.wait(f"{old} to rejoin as a replica", lambda: g.rest(old, "/replica")[0] == 200, 180)
        writer.wait_acked(writer.acked + 5, 60)
    finally:
        writer.finish()
    present, distinct = _count(whole, prefix)
    acked = writer.acked * writer.rows
    print(f"\n{group}: first acknowledged batch {resumed:.2f} s after the fault; {acked} rows acknowledged")
    assert present == distinct, f"{present - distinct} rows doubled"
    assert present == acked, f"{acked - present} acknowledged rows lost" if present < acked else f"{present - acked} extra"
    return resumed, acked


def _count(whole: Whole, prefix: str) -> tuple[int, int]:
    """Rows and distinct keys of ``prefix`` through the coordinator. A query can fail once with
    "terminating connection due to administrator command" while an old primary rejoins (README,
    limitations: retry it); it is retried on a new connection, a few times."""
    for attempt in range(5):
        try:
            with whole.handle.coordinator() as conn:
                return ha_tools.count_rows(conn, prefix)
        except psycopg.OperationalError:
            if attempt == 4:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def _wait_synchronous(whole: Whole) -> None:
    """Before a fault: every group's replica is its synchronous standby again (one that rejoined
    after an earlier scenario, maybe on a host another group's fault restarted, may still be
    catching up; Patroni rightly refuses to promote a replica that is not in sync)."""
    for name, g in whole.hosts.groups.items():
        g.wait(f"{name}'s replica to be in sync", lambda g=g: any(g.rest(m, "/sync")[0] == 200 for m in g.members), 120)


def _primary(g: HostGroup) -> str | None:
    found = [m for m in g.members if g.rest(m, "/primary")[0] == 200]
    return found[0] if len(found) == 1 else None


def test_worker_primary_killed_with_agent_alive(whole: Whole) -> None:
    g = whole.group("w1")

    def fault() -> tuple[str, float]:
        host = g.members[leader(g)]
        return host, kill_primary(g)

    resumed, _ = _scenario(whole, "w1", fault, lambda _h: None)
    # target 1 s (bench/failover.py --hosts, medians of 3); slack for a loaded machine, far below the lease
    assert resumed < 5.0, f"{resumed:.1f} s: the agent did not release the leader key"


def test_coordinator_primary_host_crash(whole: Whole) -> None:
    g = whole.group("coordinator")

    def fault() -> tuple[str, float]:
        host = g.members[leader(g)]
        t = time.monotonic()
        g.net.crash(host)
        return host, t

    _scenario(whole, "coordinator", fault, g.net.restart)


def test_worker_primary_host_cut_off(whole: Whole) -> None:
    g = whole.group("w2")

    def fault() -> tuple[str, float]:
        host = g.members[leader(g)]
        t = time.monotonic()
        g.net.cut(host)
        return host, t

    _scenario(whole, "w2", fault, g.net.heal)


def test_etcd_minority_cut_off(whole: Whole) -> None:
    """An etcd host without any primary is cut off: the other two etcd members keep the DCS, no
    primary loses its lease, writes go on (a replica there drops out of sync for a while)."""
    _wait_synchronous(whole)
    primaries = {g.members[leader(g)] for g in whole.hosts.groups.values()}
    host = next(h for h in ETCD_ON if h not in primaries)
    g = next(g for g in whole.hosts.groups.values() if host in g.members.values())
    name = next(n for n, gr in whole.hosts.groups.items() if gr is g)
    directory = whole.handle.directory
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    before = {n: leader(gr) for n, gr in whole.hosts.groups.items()}
    writer = ha_tools.Writer(directory, prefix, rows=100).start()
    try:
        writer.wait_acked(10, 60)
        whole.hosts.net.cut(host)
        try:
            writer.wait_acked(writer.acked + 20, 90)  # writes go on while the minority is cut off
        finally:
            whole.hosts.net.heal(host)
        member = next(m for m, h in g.members.items() if h == host)
        g.wait(f"{member} back as a replica", lambda: g.rest(member, "/replica")[0] == 200, 120)
        writer.wait_acked(writer.acked + 5, 60)
    finally:
        writer.finish()
    assert {n: leader(gr) for n, gr in whole.hosts.groups.items()} == before, f"a leader changed although {name} kept its lease"
    present, distinct = _count(whole, prefix)
    assert present == distinct == writer.acked * writer.rows

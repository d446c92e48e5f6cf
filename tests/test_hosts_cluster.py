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
* the host of w2's primary cut off, then healed: writes through the coordinator resume within a
  few seconds of the promotion (its FDW servers' tcp_user_timeout and connect_timeout);
* an etcd-only minority: the etcd host without any primary cut off, then healed;
* the coordinator primary's host cut off, then healed;
* a worker primary's host frozen (SIGSTOP), thawed after its replica was promoted;
* a worker primary's host crashed (every process killed), then restarted.

A test-only trigger on every worker fragment records, with each row, the server's system
identifier and timeline and the time (every host shares this machine's clock): after each scenario
every worker group's rows carry one system identifier, and no row was written on timeline N after
timeline N+1 began (the mtime of N+1's history file on the primary)."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from orchestrator.tasks import runner
from tests import ha_tools, netns
from tests.harness import ClusterHandle, make_tmp_dir, write_csv
from tests.hosts_tools import (
    NAMESPACE,
    HostCluster,
    HostGroup,
    host_cli,
    kill_primary,
    leader,
    make_cluster,
    restart_agent,
)

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


@pytest.fixture(scope="module")
def whole() -> Iterator[Whole]:
    """The cluster as a user builds it: `host plan` from a hosts spec, each host's agent, then
    `host init` (etcd authentication, every group's primary and synchronous standby, and
    ``init_remote`` with the planned topology, runtime ``hosts``), all into one DIR."""
    net = netns.Network(HOSTS)
    base = make_tmp_dir("bs-hosts5-")
    directory: Path | None = None
    try:
        hc = make_cluster(net, base, ETCD_ON, LAYOUT, split_points=("m",))
        directory = base
        handle = ClusterHandle(directory)
        topo = handle.topology
        assert topo.runtime == "hosts" and topo.cluster_name == NAMESPACE.strip("/"), topo
        assert [(g.name, g.role, g.address) for g in topo.groups] == [
            (g.name, g.role, ",".join(f"{hc.net.address(m.host)}:{g.pg_port}" for m in g.members)) for g in hc.plan.groups
        ]
        _record_timelines(handle)
        # the task runner keeps the foreign servers led by each worker's primary (fdwroute.py); the
        # balancer stays paused: the scenarios count rows per fragment
        handle.run_cli("balancer", "pause", "--note", "hosts test")
        runner.start_daemon(directory)
        yield Whole(hc, handle)
    finally:
        if directory is not None:
            runner.stop_daemon(directory)
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


def test_host_plan_and_init_again_change_nothing(whole: Whole) -> None:
    """A user reruns both commands on the running cluster: `host plan` keeps every key and
    password (no member config changes), `host init` finds etcd's users and every group's
    primary, and the setup has nothing to apply."""
    directory = whole.handle.directory
    # keys, certificates and configs (not data directories: they change while the members run)
    patterns = ("ca.crt", "hosts/*/tls/*", "hosts/*/agent/*", "hosts/*/*/patroni.yml", "hosts/*/*/tls/*", "tls/*")
    kept = {p: p.read_bytes() for pattern in patterns for p in directory.glob(pattern)}
    assert len(kept) > 30, sorted(kept)
    secrets = (directory / "host-secrets.json").read_bytes()
    host_cli("plan", "--spec", str(directory / "spec.toml"), directory=directory)
    assert (directory / "host-secrets.json").read_bytes() == secrets
    assert {p: p.read_bytes() for p in kept} == kept
    said = " ".join(host_cli("init", directory=directory).split())
    assert "etcd: authentication on, users exist" in said, said
    assert all(f"{g}: primary {g}-" in said for g in LAYOUT), said
    assert "setup: catalog and fragments up to date" in said, said
    with whole.handle.coordinator() as conn:
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT count(*) FROM readings").fetchall())
        assert "Runs on: workers" in plan, plan


# split point "m": buildings of w1 sort before it, of w2 after it; the coordinator holds none
PREFIX = {"w1": "a", "w2": "t", "coordinator": "t"}
WORKERS = ("w1", "w2")
# where no socket timeout fires (a frozen host, a cut coordinator), the writer gives up on an
# attempt after this; above the FDW servers' tcp_user_timeout (3 s), or a coordinator session
# that reaches the new worker primary just after it would be given up every time
CLIENT_DEADLINE_S = 6.0

# Test only: with every row a fragment stores, which server (system identifier) wrote it, on which
# timeline (of the WAL insert position: pg_walfile_name names it) and when. SECURITY DEFINER: the
# FDW role needs no rights on the side table.
RECORD_TIMELINE = """
CREATE SCHEMA IF NOT EXISTS bstest;
CREATE TABLE IF NOT EXISTS bstest.written (building text, ts timestamptz, sysid bigint, tl int, at timestamptz);
CREATE OR REPLACE FUNCTION bstest.record() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  INSERT INTO bstest.written VALUES (NEW.building, NEW.ts, (SELECT system_identifier FROM pg_control_system()),
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, clock_timestamp());
  RETURN NULL;
END $$;
"""


def _record_timelines(handle: ClusterHandle) -> None:
    from orchestrator import catalog

    with handle.coordinator() as conn:
        fragments = catalog.load_fragments(conn)
    for worker in WORKERS:
        with handle.worker(worker) as conn:
            conn.execute(RECORD_TIMELINE)
            for f in (f for f in fragments if f.node == worker):
                conn.execute(
                    sql.SQL(
                        "CREATE TRIGGER bstest_record AFTER INSERT ON bsdata.{} FOR EACH ROW EXECUTE FUNCTION bstest.record()"
                    ).format(sql.Identifier(f.shard_name))
                )


def _timelines_began(whole: Whole, worker: str) -> dict[int, datetime]:
    """When each timeline after the first of ``worker`` began, from Patroni's /history (an entry
    [N, lsn, reason, time, leader]: timeline N ended, N+1 began, at the mtime of N+1's history
    file on the member that promoted), the earliest any member reports."""
    g = whole.group(worker)
    began: dict[int, datetime] = {}
    for member in g.members:
        code, history = g.rest(member, "/history")
        if code != 200 or not isinstance(history, list):
            continue
        for entry in history:
            if len(entry) >= 4 and entry[3]:
                at = datetime.fromisoformat(str(entry[3]))
                began[int(entry[0]) + 1] = min(at, began.get(int(entry[0]) + 1, at))
    return began


def _check_timelines(whole: Whole, prefix: str) -> dict[str, list[int]]:
    """Every worker group's rows of ``prefix``: one system identifier, the primary's; none written
    on timeline N after N+1 began. Returns the timelines each group's rows were written on."""
    seen: dict[str, list[int]] = {}
    for worker in WORKERS:
        with whole.handle.worker(worker) as conn:
            row = conn.execute(
                "SELECT system_identifier, ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int "
                "FROM pg_control_system()"
            ).fetchone()
            assert row is not None
            sysid, current = row
            rows = conn.execute(
                "SELECT tl, array_agg(DISTINCT sysid), max(at) FROM bstest.written "
                "WHERE building LIKE %s GROUP BY tl ORDER BY tl",
                (prefix + "%",),
            ).fetchall()
        began = _timelines_began(whole, worker)
        deadline = time.monotonic() + 30  # the leader adds a new timeline to the DCS history on its next loops
        while not all(t in began for t in range(2, current + 1)) and time.monotonic() < deadline:
            time.sleep(1)
            began = _timelines_began(whole, worker)
        answers = {m: whole.group(worker).rest(m, "/history") for m in whole.group(worker).members}
        assert all(t in began for t in range(2, current + 1)), f"{worker}: no start of timelines 2..{current}: {answers}"
        for tl, ids, last in rows:
            assert ids == [sysid], f"{worker}: timeline {tl} written by servers {ids}, the group is {sysid}"
            later = [b for t, b in began.items() if t > tl]
            assert not later or last < min(later), f"{worker}: a row written on timeline {tl} at {last}, after the next began"
        seen[worker] = [r[0] for r in rows]
    return seen


@dataclass(frozen=True)
class Outcome:
    resumed_s: float  # fault -> first batch acknowledged through the coordinator
    promoted_s: float | None  # fault -> the new timeline began (a worker group), from its history file
    acked: int
    timelines: dict[str, list[int]]


def _scenario(
    whole: Whole,
    group: str,
    fault: Callable[[], tuple[str, float]],
    recover: Callable[[str], None],
    attempt_s: float | None = None,
) -> Outcome:
    """Writer through the coordinator, into buildings of ``group``'s rows (the coordinator: any);
    fault (returns the faulted host and the time of the fault); wait for writes to resume;
    recover; wait for the old primary to rejoin; every acknowledged row exactly once, none written
    on an old timeline after a new one began; queries answer. ``attempt_s``: the writer's own
    deadline per batch (a client's; needed where no socket timeout can fire: a frozen host)."""
    g = whole.group(group)
    directory = whole.handle.directory
    prefix = f"{PREFIX[group]}{uuid.uuid4().hex[:8]}_"
    _wait_synchronous(whole)
    _isolate(whole, group)
    old = leader(g)
    writer = ha_tools.Writer(directory, prefix, rows=100, attempt_s=attempt_s).start()
    try:
        writer.wait_acked(10, 60)
        wall0, mono0 = time.time(), time.monotonic()
        host, t0 = fault()
        wall0 += t0 - mono0  # the wall time of the fault itself (fault() first looks up the primary)
        # a batch begun before the fault took effect may still commit: count from after it
        t1 = time.monotonic()
        try:
            g.wait(f"a new primary of {group}", lambda: _primary(g) not in (None, old), 90)
            deadline = time.monotonic() + 60
            while writer.recovery_after(t1) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            after = writer.recovery_after(t1)
            assert after is not None, f"writes did not resume within 60 s: {writer.failures_after(t1)[-3:]}; {_waits(whole)}"
            resumed = after + (t1 - t0)
        finally:
            recover(host)
        g.wait(f"{old} to rejoin as a replica", lambda: g.rest(old, "/replica")[0] == 200, 180)
        writer.wait_acked(writer.acked + 5, 60)
    finally:
        writer.finish()
    present, distinct = _count(whole, prefix)
    acked = writer.acked * writer.rows
    timelines = _check_timelines(whole, prefix)
    promoted = None
    if group in WORKERS:
        _wait_led_by_primary(whole, group)
        began = _timelines_began(whole, group)
        assert len(timelines[group]) > 1, f"{group}: every row on timeline {timelines[group]}: no promotion was seen"
        promoted = began[max(timelines[group])].timestamp() - wall0
    shown = f", {resumed - promoted:.2f} s after the promotion ({promoted:.2f} s)" if promoted is not None else ""
    print(f"\n{group}: first acknowledged batch {resumed:.2f} s after the fault{shown}; {acked} rows acknowledged")
    failures = writer.failures_after(t1)
    for a in failures[:3] + failures[3:][-6:]:  # what the writer saw meanwhile (seconds after the fault)
        print(f"  {a.started - t0:6.2f}-{a.finished - t0:6.2f} s: {a.error}")
    assert present == distinct, f"{present - distinct} rows doubled"
    assert present == acked, f"{acked - present} acknowledged rows lost" if present < acked else f"{present - acked} extra"
    return Outcome(resumed, promoted, acked, timelines)


def _waits(whole: Whole) -> str:
    """What the sessions on every group's primary wait for (a failure's message)."""
    found = []
    for name, g in whole.hosts.groups.items():
        try:
            with psycopg.connect(g.conninfo(), autocommit=True) as conn:
                sync = conn.execute("SHOW synchronous_standby_names").fetchone()
                rows = conn.execute(
                    "SELECT wait_event_type, wait_event, state, left(query, 60) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state <> 'idle'"
                ).fetchall()
                found.append(f"{name}: sync={sync} {rows}")
        except psycopg.Error as exc:
            found.append(f"{name}: {str(exc).splitlines()[0]}")
    return "; ".join(found)


def _wait_led_by_primary(whole: Whole, worker: str) -> None:
    """The task runner (fdwroute.py) put the worker's primary first in its foreign server."""
    from orchestrator import executor

    g = whole.group(worker)
    want = g.net.address(g.members[leader(g)])

    def led() -> bool:
        with whole.handle.coordinator() as conn:
            address = executor.foreign_server_address(conn, f"bs_{worker}")
        return address is not None and address[0].split(",")[0] == want

    g.wait(f"bs_{worker} led by its primary {want}", led, 15)


def _isolate(whole: Whole, group: str) -> None:
    """Leave ``group``'s primary alone on its host: another group's primary there (an earlier
    fault moved it) is switched over with `buildsmart switchover`, so each scenario faults one
    group's primary."""
    host = whole.group(group).members[leader(whole.group(group))]
    for name, other in whole.hosts.groups.items():
        if name != group and other.members[leader(other)] == host:
            whole.handle.run_cli("switchover", name)
            _wait_synchronous(whole)


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


def _on_leader_host(g: HostGroup, act: Callable[[str], None]) -> Callable[[], tuple[str, float]]:
    """The fault of a scenario: ``act`` (crash, cut, freeze) on the host of the group's leader;
    returns that host and the moment of the fault."""

    def fault() -> tuple[str, float]:
        host = g.members[leader(g)]
        t = time.monotonic()
        act(host)
        return host, t

    return fault


def test_worker_primary_killed_with_agent_alive(whole: Whole) -> None:
    g = whole.group("w1")

    def fault() -> tuple[str, float]:
        host = g.members[leader(g)]
        return host, kill_primary(g)

    out = _scenario(whole, "w1", fault, lambda _h: None)
    # target 1 s (bench/failover.py --hosts, medians of 3); slack for a loaded machine, far below the lease
    assert out.resumed_s < 5.0, f"{out.resumed_s:.1f} s: the agent did not release the leader key"


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

    out = _scenario(whole, "w2", _on_leader_host(g, g.net.cut), g.net.heal)
    _assert_follows_promotion(out)


def _assert_follows_promotion(out: Outcome, within_s: float = 5.0) -> None:
    """Writes through the coordinator follow a worker's promotion at once: the FDW connection in
    flight and an attempt on the lost host give up after the FDW servers' tcp_user_timeout (3 s),
    and the task runner puts the promoted member first in the foreign server (fdwroute.py).
    Target about 2 s; slack for this loaded machine (was 23-39 s with 30 s and without the order)."""
    assert out.promoted_s is not None
    after = out.resumed_s - out.promoted_s
    assert after < within_s, f"first write {after:.1f} s after the worker's promotion ({out.resumed_s:.1f} s after the fault)"


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
    timelines = _check_timelines(whole, prefix)
    assert len(timelines["w2"]) == 1 and not timelines["w1"], f"no timeline may change: {timelines}"


def test_coordinator_primary_host_cut_off(whole: Whole) -> None:
    """The client's own deadline (CLIENT_DEADLINE_S) ends its wait on the cut coordinator; its connection's
    tcp_user_timeout (30 s, connections.LIVENESS_PARAMS) would end it later."""
    g = whole.group("coordinator")

    _scenario(whole, "coordinator", _on_leader_host(g, g.net.cut), g.net.heal, attempt_s=CLIENT_DEADLINE_S)


def test_worker_primary_host_frozen(whole: Whole) -> None:
    """Every process of w1's primary's host stopped (SIGSTOP) and continued once its replica was
    promoted. The host's kernel still acknowledges TCP, so no socket timeout fires: the writer
    abandons an attempt after CLIENT_DEADLINE_S (a client's deadline) and its next session's FDW connection
    gives up on the frozen host after connect_timeout."""
    g = whole.group("w1")

    out = _scenario(whole, "w1", _on_leader_host(g, g.net.freeze), g.net.thaw, attempt_s=CLIENT_DEADLINE_S)
    # a coordinator session that began connecting to the frozen host before the task runner took
    # it out of the foreign server waits until the host thaws: the client's deadline ends it
    _assert_follows_promotion(out, CLIENT_DEADLINE_S + 1.0)


def test_worker_primary_host_crash(whole: Whole) -> None:
    g = whole.group("w2")

    out = _scenario(whole, "w2", _on_leader_host(g, g.net.crash), g.net.restart)
    _assert_follows_promotion(out)


def test_operations_across_hosts(whole: Whole) -> None:
    """status (members, roles, lag and timelines per host), switchover, fragment move and migrate,
    run as a user runs them, from the test's namespace (not a host of the cluster)."""
    import json

    from orchestrator import catalog

    _wait_synchronous(whole)
    out = whole.handle.run_cli("status", "--json").stdout
    data = json.loads(out)
    for node in data["nodes"]:
        g = whole.group(node["name"])
        assert node["up"] and node["in_recovery"] is False, node
        members = {m["name"]: m for m in node["members"]}
        assert {n: m["host"] for n, m in members.items()} == {n: g.net.address(h) for n, h in g.members.items()}, node
        roles = sorted(m["role"] for m in members.values())
        assert roles.count("leader") == 1 and "sync_standby" in roles, node
        assert all(m["timeline"] and m["state"] in ("running", "streaming") for m in members.values()), node
        assert all(m["lag_bytes"] is not None for m in members.values() if m["role"] != "leader"), node

    # switchover of w1: the other member leads, the old one follows, writes through the coordinator go on
    g = whole.group("w1")
    old = leader(g)
    done = whole.handle.run_cli("switchover", "w1")
    said = done.stdout + done.stderr
    new = leader(g)
    assert new != old and f"from {old} to {new}" in " ".join(said.split()), said
    g.wait(f"{old} to rejoin as a replica", lambda: g.rest(old, "/replica")[0] == 200, 120)
    prefix = f"a{uuid.uuid4().hex[:8]}_"
    writer = ha_tools.Writer(whole.handle.directory, prefix, rows=100, max_batches=20).start()
    writer.wait_acked(20, 60)
    writer.finish()
    assert writer.acked == 20 and _count(whole, prefix) == (2000, 2000)

    # fragment move across hosts: w1's fragment to w2 (logical replication between hosts, TLS)
    with whole.handle.coordinator() as conn:
        frag = next(f for f in catalog.load_fragments(conn) if f.node == "w1")
        before = conn.execute("SELECT count(*) FROM readings WHERE building < 'm'").fetchone()
    done = whole.handle.run_cli("fragment", "move", str(frag.fragment_id), "w2")
    moved = done.stdout + done.stderr
    assert "moved" in moved, moved
    with whole.handle.coordinator() as conn:
        assert next(f for f in catalog.load_fragments(conn) if f.fragment_id == frag.fragment_id).node == "w2"
        assert conn.execute("SELECT count(*) FROM readings WHERE building < 'm'").fetchone() == before
    with whole.handle.worker("w2") as conn:
        held = conn.execute(sql.SQL("SELECT count(*) FROM bsdata.{}").format(sql.Identifier(frag.shard_name))).fetchone()
        assert held == before, f"{frag.shard_name} on w2 holds {held}, the coordinator counted {before}"

    # migrate: every node and fragment in one two-phase commit, up and back down
    whole.handle.run_cli("migrate", "head")
    for name in ("coordinator", "w2"):
        relation = "public.readings" if name == "coordinator" else f"bsdata.{frag.shard_name}"
        with whole.handle.coordinator() if name == "coordinator" else whole.handle.worker(name) as conn:
            cols = conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0", (relation,))
            assert "kw" in {r[0] for r in cols.fetchall()}, f"{relation} on {name} has no kw column after migrate"
    whole.handle.run_cli("migrate", "base", "--down")
    with whole.handle.coordinator() as conn:
        cols = conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'public.readings'::regclass AND attnum > 0")
        assert "kw" not in {r[0] for r in cols.fetchall()}
        assert conn.execute("SELECT count(*) FROM readings WHERE building < 'm'").fetchone() == before


def test_node_add_of_a_group_added_to_the_plan(whole: Whole) -> None:
    """`node add` on a hosts cluster (last: the other tests know three groups): a [groups.w3]
    table added to the spec, `host plan` again (the other members' files kept), the agents of its
    hosts restarted (what `host down` and `host up` do), then `node add w3` gives its members their
    etcd users, waits for its primary and synchronous standby and registers it; a fragment moved
    onto it keeps its rows."""
    import json

    from orchestrator import catalog, executor

    directory = whole.handle.directory
    configs = {p: p.read_bytes() for p in directory.glob("hosts/*/*/patroni.yml")}
    spec = directory / "spec.toml"
    spec.write_text(spec.read_text() + '\n[groups.w3]\nhosts = ["h5", "h1"]\n')
    host_cli("plan", "--spec", str(spec), directory=directory)
    assert {p: p.read_bytes() for p in configs} == configs, "a re-plan changed an existing member's config"
    for h in ("h5", "h1"):
        restart_agent(whole.hosts, h)
    done = whole.handle.run_cli("node", "add", "w3")
    said = " ".join((done.stdout + done.stderr).split())
    assert "etcd: authentication was on; added users w3-0, w3-1" in said and "added worker w3" in said, said
    data = json.loads(whole.handle.run_cli("status", "--json").stdout)
    node = next(n for n in data["nodes"] if n["name"] == "w3")
    assert node["up"] and sorted(m["role"] for m in node["members"]) == ["leader", "sync_standby"], node
    addresses = [whole.hosts.net.address(h) for h in ("h5", "h1")]
    assert sorted(m["host"] for m in node["members"]) == sorted(addresses), node
    with whole.handle.coordinator() as conn:
        address = executor.foreign_server_address(conn, "bs_w3")
        assert address is not None and sorted(address[0].split(",")) == sorted(addresses), address
        frag = next(f for f in catalog.load_fragments(conn) if f.node == "w2")
        before = conn.execute("SELECT count(*) FROM readings").fetchone()
    done = whole.handle.run_cli("fragment", "move", str(frag.fragment_id), "w3")
    assert "moved" in done.stdout + done.stderr, done.stdout + done.stderr
    with whole.handle.coordinator() as conn:
        assert next(f for f in catalog.load_fragments(conn) if f.fragment_id == frag.fragment_id).node == "w3"
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == before

"""Each worker's foreign server on the coordinator led by the group's current primary.

A worker's foreign server lists every member of its group (``target_session_attrs=read-write``:
libpq tries them in order and keeps the primary). The coordinator's backends connect
asynchronously (postgres_fdw and the distributed executor use PostgreSQL's ``libpqsrv_connect``),
so libpq's ``connect_timeout`` does not apply there: an attempt on a member whose host is cut off
waits for the FDW servers' ``tcp_user_timeout``, one on a frozen host (its kernel still answers
TCP) until the host thaws. After a worker's host is lost, every new coordinator session would
try the lost member first.

So on a multi-host cluster the elected task runner keeps each list as Patroni's DCS says, in a
thread of its own (:class:`Follower`, every 0.5 s; a periodic task would wait behind the others,
e.g. a rollup refresh blocked on the very worker that was lost): the leader first, then the
members whose Patroni member key exists, in topology order; a member whose key expired with its
lease (its host lost) is left out until it registers again. The order decides only which server
is tried first: ``read-write`` still refuses every server but the primary, so a stale order costs
time, never safety. Without an answer from etcd nothing changes. The decision is :func:`route`,
pure over a snapshot of the DCS."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from orchestrator import executor, runtime, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import BuildSmartError
from orchestrator.planner import NodeSpec
from orchestrator.runtime import etcd, patroni
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.topology import Group, Member, Topology

log = logging.getLogger(__name__)

FOLLOW_S = 0.5  # how often the foreign servers are compared with the DCS


@dataclass(frozen=True)
class GroupDcs:
    """What etcd says about one Patroni group: who holds the leader key, whose member keys exist."""

    leader: str | None
    registered: frozenset[str]


def route(members: Sequence[Member], dcs: GroupDcs) -> tuple[str, str]:
    """(hosts, ports) of a foreign server for ``members`` (topology order) as ``dcs`` says: the
    leader first, then registered members; every member when none is known (a DCS that lost its
    keys must not leave the coordinator without a server to try)."""
    live = [m for m in members if m.name == dcs.leader or m.name in dcs.registered] or list(members)
    live.sort(key=lambda m: m.name != dcs.leader)  # stable: the rest keep the topology's order
    return ",".join(m.host for m in live), ",".join(str(m.port) for m in live)


def snapshot(keys: dict[str, str], namespace: str, groups: Sequence[Group]) -> dict[str, GroupDcs]:
    """The groups' DCS state from the keys under ``namespace`` (one etcd range read)."""
    out = {}
    for g in groups:
        base = f"{namespace}{patroni.scope(g)}/"
        names = {m.name for m in g.members}
        registered = frozenset(k[len(base + "members/") :] for k in keys if k.startswith(base + "members/")) & names
        leader = keys.get(base + "leader")
        out[g.name] = GroupDcs(leader if leader in names else None, registered)
    return out


def follow(coord: psycopg.Connection, topo: Topology, settings: HaSettings) -> list[str]:
    """Point every multi-member worker's foreign server as the DCS says; returns what changed.
    Raises NodeError when no etcd member answers (then nothing changed)."""
    workers = [g for g in topo.workers if len(g.members) > 1]
    if not workers:
        return []
    keys = etcd.get_prefix(etcd.Client.of(settings), patroni.namespace(topo))
    changed = []
    views = snapshot(keys, patroni.namespace(topo), workers)
    for g in workers:
        dcs = views[g.name]
        server = NodeSpec(g.name, g.role, g.hosts, g.ports, g.dbname).server_name
        hosts, ports = route(g.members, dcs)
        if executor.foreign_server_address(coord, server) not in (None, (hosts, ports)):
            executor.point_foreign_server(coord, server, hosts, ports)
            log.info("foreign server %s now tries %s (ports %s) first: leader %s", server, hosts, ports, dcs.leader)
            changed.append(f"{server}: {hosts}")
    return changed


class Follower:
    """:func:`follow` every FOLLOW_S on a coordinator connection of its own, while the task
    runner that started it is elected; ends by itself on a cluster whose runtime does not route
    by the DCS (every member on one host: a lost member refuses connections at once)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fdw-route", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _settings(self, topo: Topology) -> HaSettings | None:
        rt = runtime.for_cluster(self.directory, topo)
        return rt.ha() if rt.routes_fdw_by_dcs else None

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        failing: str | None = None
        try:
            try:
                if self._settings(topology.load(self.directory)) is None:
                    return
            except BuildSmartError as exc:
                log.warning("foreign servers will not follow the workers' primaries: %s", exc)
                return
            log.info("foreign servers follow each worker's primary (every %.1f s)", FOLLOW_S)
            while not self._stop.wait(FOLLOW_S):
                try:
                    topo = topology.load(self.directory)  # a node added or removed
                    settings = self._settings(topo)
                    if settings is None:
                        return
                    if conn is None or conn.closed:
                        conn = connect(superuser_target(topo.coordinator, topology.load_credentials(self.directory)),
                                       "fdw-route", autocommit=True)  # fmt: skip
                    follow(conn, topo, settings)
                    failing = None
                except (BuildSmartError, psycopg.Error) as exc:
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    if message != failing:  # once per distinct failure, not every 0.5 s
                        log.info("foreign server order unchanged: %s; retrying", message)
                        failing = message
                    if conn is not None and (isinstance(exc, psycopg.Error) or conn.broken):
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()

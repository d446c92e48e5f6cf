"""Cluster status as ONE frozen snapshot (:class:`ClusterStatus`) that the CLI renders and that
``/metrics`` or a web console can render the same way.

Cheap at any size: no query reads rows. Per worker, one catalog query gives every fragment's
bytes (``pg_total_relation_size`` of its partitions and indexes), live rows as the statistics
system counts them (``n_live_tup``, maintained at every commit) and time partitions
(orchestrator.elastic.observe). Exact row counts (``count(*)`` of every fragment: a scan of all
data) only with ``exact=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog, topology
from orchestrator.backup.decide import BackupStatus
from orchestrator.check import LastCheck, last_check
from orchestrator.connections import connect, superuser_target
from orchestrator.elastic import observe
from orchestrator.elastic.policy import policy_from
from orchestrator.exceptions import BuildSmartError
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberStatus:
    name: str
    host: str
    port: int
    role: str | None
    state: str | None
    timeline: int | None
    lag_bytes: int | None
    sync: bool


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    address: str
    up: bool
    in_recovery: bool | None
    size_bytes: int | None
    error: str | None = None
    members: tuple[MemberStatus, ...] = ()
    members_error: str | None = None


@dataclass(frozen=True)
class FragmentStatus:
    fragment_id: int
    shard_name: str
    range_from: str | None
    range_to: str | None
    ts_from: datetime | None
    ts_to: datetime | None
    time_group: str | None
    node: str
    time_interval: str
    rows: int | None  # live rows from statistics, or exact with --exact
    rows_exact: bool
    bytes: int | None
    time_partitions: int | None


@dataclass(frozen=True)
class WorkerShare:
    node: str
    fragments: int
    bytes: int
    rows: int
    vs_mean: float | None  # bytes / mean bytes per worker - 1


@dataclass(frozen=True)
class BalancerStatus:
    paused: bool
    paused_note: str | None
    auto_layout: bool
    settings: Mapping[str, Any]  # the effective policy
    runner: str | None  # host:pid of the elected task runner (None: none runs)
    decisions: tuple[catalog.DecisionEntry, ...]  # newest first
    open_jobs: tuple[tuple[int, str, str, str], ...]  # job id, kind, state, step


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    nodes: tuple[NodeStatus, ...]
    fragments: tuple[FragmentStatus, ...]
    workers: tuple[WorkerShare, ...]
    balancer: BalancerStatus | None
    tasks: tuple[catalog.TaskRun, ...]
    mirror: Mapping[str, Any] | None
    mirror_error: str | None = None
    backup: BackupStatus | None = None  # None: the backup state could not be read (backup_error)
    backup_error: str | None = None
    check: LastCheck | None = None  # the newest `buildsmart check` run (None: never run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _node_status(topo: Topology, creds: Credentials, name: str) -> NodeStatus:
    group = topo.group(name)
    try:
        with connect(superuser_target(group, creds), "status", autocommit=True, statement_timeout_ms=10_000) as conn:
            row = conn.execute(
                "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_database_size(current_database())"
            ).fetchone()
            assert row is not None
            return NodeStatus(name, group.role, group.address, True, row[0], row[1])
    except BuildSmartError as exc:
        return NodeStatus(name, group.role, group.address, False, None, None, str(exc).splitlines()[0])


def _with_members(directory: Path, node: NodeStatus) -> NodeStatus:
    from orchestrator.runtime import ha  # late: the HA runtime is not needed for the rest

    try:
        raw = ha.group_members_status(directory, node.name)
    except BuildSmartError as exc:
        return replace(node, members=(), members_error=str(exc))
    members = tuple(
        MemberStatus(
            str(m["name"]), str(m["host"]), int(m["port"]), m.get("role"), m.get("state"), m.get("timeline"),
            m.get("lag_bytes"), bool(m.get("sync")),
        )
        for m in raw
    )  # fmt: skip
    return replace(node, members=members)


def _exact_rows(conn: psycopg.Connection, shards: list[str]) -> dict[str, int]:
    out = {}
    for shard in shards:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SHARD_SCHEMA, shard))).fetchone()
        out[shard] = int(row[0]) if row else 0
    return out


def _fragments(
    topo: Topology, creds: Credentials, frags: tuple[Fragment, ...], up: set[str], exact: bool
) -> tuple[FragmentStatus, ...]:
    by_node: dict[str, list[Fragment]] = {}
    for f in frags:
        by_node.setdefault(f.node, []).append(f)
    sizes: dict[str, tuple[int, int, int, int]] = {}
    counted: dict[str, int] = {}
    for node, members in by_node.items():
        if node not in up:
            continue
        with connect(superuser_target(topo.group(node), creds), "status", autocommit=True, statement_timeout_ms=60_000) as conn:
            sizes.update(observe.sample_node(conn, members))
            if exact:
                counted.update(_exact_rows(conn, [f.shard_name for f in members]))
    out = []
    for f in frags:
        size = sizes.get(f.shard_name)
        rows = counted.get(f.shard_name, size[1] if size else None)
        out.append(
            FragmentStatus(
                f.fragment_id, f.shard_name, f.range_from, f.range_to, f.ts_from, f.ts_to, f.time_group, f.node,
                f.time_interval, rows, f.shard_name in counted, size[0] if size else None, size[3] if size else None,
            )
        )  # fmt: skip
    return tuple(out)


def worker_shares(workers: tuple[str, ...], fragments: tuple[FragmentStatus, ...]) -> tuple[WorkerShare, ...]:
    """Bytes and rows per worker and each worker's distance from the mean. Pure."""
    totals = {w: [0, 0, 0] for w in workers}
    for f in fragments:
        t = totals.setdefault(f.node, [0, 0, 0])
        t[0] += 1
        t[1] += f.bytes or 0
        t[2] += f.rows or 0
    mean = sum(t[1] for t in totals.values()) / len(totals) if totals else 0
    return tuple(WorkerShare(w, t[0], t[1], t[2], (t[1] / mean - 1) if mean else None) for w, t in sorted(totals.items()))


def _election_holder(conn: psycopg.Connection) -> str | None:
    from orchestrator.tasks.runner import ELECTION_LOCK  # late: the runner imports this package's siblings

    row = conn.execute(
        "SELECT a.application_name FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = 0 AND l.granted",
        (ELECTION_LOCK,),
    ).fetchone()
    return None if row is None else str(row[0]).removeprefix("buildsmart:tasks:")


def balancer_status(conn: psycopg.Connection, decisions: int) -> BalancerStatus:
    state = catalog.balancer_state(conn)
    jobs = conn.execute(
        "SELECT job_id, kind, state, step FROM buildsmart.jobs WHERE state IN ('scheduled', 'running') ORDER BY job_id"
    ).fetchall()
    return BalancerStatus(
        state.paused,
        state.paused_note,
        state.auto_layout,
        policy_from(state.settings).as_dict(),
        _election_holder(conn),
        catalog.recent_decisions(conn, decisions),
        tuple((int(j[0]), str(j[1]), str(j[2]), str(j[3])) for j in jobs),
    )


def collect(directory: Path, exact: bool = False, decisions: int = 10) -> ClusterStatus:
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    nodes = tuple(_with_members(directory, _node_status(topo, creds, g.name)) for g in topo.groups)
    up = {n.name for n in nodes if n.up}
    fragments: tuple[FragmentStatus, ...] = ()
    workers: tuple[WorkerShare, ...] = ()
    balancer: BalancerStatus | None = None
    tasks: tuple[catalog.TaskRun, ...] = ()
    last: LastCheck | None = None
    if topo.coordinator.name in up:
        with connect(superuser_target(topo.coordinator, creds), "status", autocommit=True) as conn:
            if catalog.has_catalog(conn):
                frags = catalog.load_fragments(conn)
                active = catalog.active_workers(conn)
                balancer = balancer_status(conn, decisions)
                tasks = catalog.task_runs(conn)
                last = last_check(conn)
            else:
                frags, active = (), ()
        fragments = _fragments(topo, creds, frags, up, exact)
        workers = worker_shares(active, fragments)
    mirror, mirror_error = _mirror(directory)
    backup, backup_error = _backup(directory)
    return ClusterStatus(
        topo.cluster_name, nodes, fragments, workers, balancer, tasks, mirror, mirror_error, backup, backup_error, last
    )


def _backup(directory: Path) -> tuple[BackupStatus | None, str | None]:
    from orchestrator.backup import ops  # late: pulls in the backup engine

    try:
        return ops.status(directory), None
    except BuildSmartError as exc:
        return None, str(exc)


def _mirror(directory: Path) -> tuple[Mapping[str, Any] | None, str | None]:
    from orchestrator.metadata.mirror import mirror_lag  # late: pulls in the MongoDB driver

    try:
        return mirror_lag(directory), None
    except BuildSmartError as exc:
        return None, str(exc)

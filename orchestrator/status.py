"""Cluster status: nodes (up/down, role, address, size) and fragments (range, node, rows, bytes)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import sql

from orchestrator import catalog
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import BuildSmartError
from orchestrator.fragments import SHARD_SCHEMA
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    address: str
    up: bool
    in_recovery: bool | None
    size_bytes: int | None
    error: str | None = None


@dataclass(frozen=True)
class FragmentStatus:
    fragment_id: int
    shard_name: str
    range_from: str | None
    range_to: str | None
    node: str
    time_interval: str
    rows: int | None
    bytes: int | None
    time_partitions: int | None


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


def _fragment_sizes(topo: Topology, creds: Credentials, node: str, shards: list[str]) -> dict[str, tuple[int, int, int]]:
    """rows, bytes (all time partitions, indexes included), partition count for each shard."""
    result: dict[str, tuple[int, int, int]] = {}
    with connect(superuser_target(topo.group(node), creds), "status", autocommit=True, statement_timeout_ms=60_000) as conn:
        for shard in shards:
            rel = f"{SHARD_SCHEMA}.{shard}"
            rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SHARD_SCHEMA, shard))).fetchone()
            size = conn.execute(
                "SELECT coalesce(sum(pg_catalog.pg_total_relation_size(relid)), 0), count(*) FILTER (WHERE isleaf) "
                "FROM pg_catalog.pg_partition_tree(%s::regclass)",
                (rel,),
            ).fetchone()
            assert rows is not None and size is not None
            result[shard] = (int(rows[0]), int(size[0]), int(size[1]))
    return result


def collect(topo: Topology, creds: Credentials) -> dict[str, Any]:
    nodes = [_node_status(topo, creds, g.name) for g in topo.groups]
    up = {n.name for n in nodes if n.up}
    fragments: list[FragmentStatus] = []
    if topo.coordinator.name in up:
        with connect(superuser_target(topo.coordinator, creds), "status", autocommit=True) as conn:
            frags = catalog.load_fragments(conn) if catalog.has_catalog(conn) else ()
        by_node: dict[str, list[str]] = {}
        for f in frags:
            by_node.setdefault(f.node, []).append(f.shard_name)
        sizes: dict[str, tuple[int, int, int]] = {}
        for node, shards in by_node.items():
            if node in up:
                sizes.update(_fragment_sizes(topo, creds, node, shards))
        for f in frags:
            rows, size, parts = sizes.get(f.shard_name, (None, None, None))
            fragments.append(
                FragmentStatus(f.fragment_id, f.shard_name, f.range_from, f.range_to, f.node, f.time_interval, rows, size, parts)
            )
    return {
        "cluster": topo.cluster_name,
        "nodes": [asdict(n) for n in nodes],
        "fragments": [asdict(f) for f in fragments],
    }

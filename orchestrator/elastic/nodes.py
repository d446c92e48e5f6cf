"""Adding, draining and removing worker nodes.

A new node is started by the cluster's runtime (orchestrator/runtime/base.py: a local Patroni group
with as many replicas as the other nodes, watched by the failover supervisor, or one plain server
in a ``--replicas 0`` cluster); a remote node is registered from its address.
Either way :func:`orchestrator.cluster.setup` then installs the extension and
creates the foreign server and user mapping, as for the first workers. New fragments placed on it
take the coordinator's current columns (migrations included).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace

import psycopg
from psycopg import sql

from orchestrator import cluster, roles, runtime, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.elastic import balancer
from orchestrator.elastic.context import Elastic
from orchestrator.energy import rollups
from orchestrator.exceptions import BuildSmartError, ClusterStateError, ConfigError
from orchestrator.topology import WORKER, Group, Member

ROLLUP_WAIT_S = 120.0  # for the rollups of drained fragments to follow them (a full rebuild each)

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def _next_name(el: Elastic) -> str:
    used = {int(m.group(1)) for g in el.topo.groups if (m := re.fullmatch(r"w(\d+)", g.name))}
    return f"w{max(used, default=0) + 1}"


def _bootstrap(group: Group, el: Elastic) -> None:
    """Database and application role on a server we just started (idempotent)."""
    creds = el.creds
    with connect(superuser_target(group, creds, dbname="postgres"), "node-add", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (group.dbname,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(group.dbname)))
            log.info("created database %s on %s", group.dbname, group.name)
    with connect(superuser_target(group, creds), "node-add", autocommit=True) as conn:
        roles.ensure_roles(conn, roles.kind_of(group.role), creds, group.dbname)


def add_node(
    el: Elastic,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    dbname: str | None = None,
    report: Report = lambda _: None,
) -> Group:
    """Start (local) or register (``host``/``port`` given) a worker and set it up."""
    name = name or _next_name(el)
    if any(g.name == name for g in el.topo.groups):
        raise ConfigError(f"a node named {name!r} already exists")
    if host is not None:
        group = Group(
            name, WORKER, (Member(f"{name}-0", host, port or 5432),), dbname or el.topo.coordinator.dbname, managed=False
        )
        _bootstrap(group, el)
        report(f"{name}: registered remote worker at {group.address}")
    else:
        rt = runtime.for_cluster(el.directory, el.topo)
        group = rt.add_worker(el.topo, name, el.creds, report)
        try:
            _bootstrap(group, el)
        except BuildSmartError:
            log.info("bootstrap of %s failed; stopping and deleting it", name)
            rt.remove_worker(el.topo.with_group(group), name, report)
            raise
    topo = el.topo.with_group(group)
    topology.save(el.directory, topo)
    el.reload_topology()
    applied = cluster.setup(topo, el.creds, el.directory)
    log.info("added worker %s at %s (%d setup steps)", name, group.address, len(applied))
    if group.managed and runtime.for_cluster(el.directory, topo).confirm_worker(group):
        report(f"{name}: watched by the failover supervisor")
    return group


def placements_on(el: Elastic, name: str) -> list[int]:
    rows = el.coord.execute("SELECT fragment_id FROM buildsmart.placements WHERE node_name = %s ORDER BY 1", (name,)).fetchall()
    return [int(r[0]) for r in rows]


def drain_node(el: Elastic, name: str, report: Report = lambda _: None) -> int:
    """Mark the node inactive (no new placements) and move every fragment off it."""
    group = el.topo.group(name)
    if group.role != WORKER:
        raise ConfigError(f"{name} is not a worker")
    el.coord.execute("UPDATE buildsmart.nodes SET is_active = false WHERE name = %s", (name,))
    log.info("node %s marked inactive for draining", name)
    moved = balancer.run(el, tolerance=1e9, draining=frozenset({name}), report=report, job_kind="drain_run")
    left = placements_on(el, name)
    if left:
        raise ClusterStateError(f"node {name} still holds fragments {left} after draining")
    return moved


def _tables_on_server(coord: psycopg.Connection, server: str) -> list[str]:
    rows = coord.execute(
        "SELECT ft.ftrelid::regclass::text FROM pg_catalog.pg_foreign_table ft "
        "JOIN pg_catalog.pg_foreign_server s ON s.oid = ft.ftserver WHERE s.srvname = %s",
        (server,),
    ).fetchall()
    return [r[0] for r in rows]


def _wait_for_rollups_to_leave(el: Elastic, name: str, server: str, report: Report) -> None:
    """The rollups of fragments drained off ``name`` follow them (rebuilt on the new node, the
    coordinator's partitions switched), as the rollups task would do; until then their foreign
    tables still use the node's server, which cannot be dropped."""
    deadline = time.monotonic() + ROLLUP_WAIT_S
    while tables := _tables_on_server(el.coord, server):
        if time.monotonic() > deadline:
            raise ClusterStateError(
                f"{name}: foreign tables still use server {server} after {ROLLUP_WAIT_S:.0f} s ({', '.join(tables[:5])}); "
                f"nothing was removed; rerun `buildsmart node remove {name}`"
            )
        report(f"{name}: moving the rollups of its former fragments ({len(tables)} table(s) left)")
        rollups.reconcile(el.nodes)
        if _tables_on_server(el.coord, server):
            time.sleep(1.0)


def remove_node(el: Elastic, name: str, drain: bool = False, report: Report = lambda _: None) -> None:
    group = el.topo.group(name)
    if group.role != WORKER:
        raise ConfigError(f"{name} is not a worker; only workers can be removed")
    held = placements_on(el, name)
    if held and not drain:
        raise ClusterStateError(f"node {name} holds fragments {held}; use --drain to move them off first")
    if held:
        drain_node(el, name, report)
    coord = el.coord
    server = coord.execute("SELECT server_name FROM buildsmart.nodes WHERE name = %s", (name,)).fetchone()
    if server and server[0]:
        _wait_for_rollups_to_leave(el, name, server[0], report)
    with coord.transaction():
        if server and server[0]:
            coord.execute(sql.SQL("DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER {}").format(sql.Identifier(server[0])))
            coord.execute(sql.SQL("DROP SERVER IF EXISTS {}").format(sql.Identifier(server[0])))
        coord.execute(
            "DELETE FROM buildsmart.fragment_stats s USING buildsmart.placements p "
            "WHERE p.fragment_id = s.fragment_id AND p.node_name = %s",
            (name,),
        )
        coord.execute("DELETE FROM buildsmart.nodes WHERE name = %s", (name,))
        coord.execute("SELECT buildsmart.bump_catalog_version()")
    log.info("removed node %s from the catalog", name)
    if group.managed:
        runtime.for_cluster(el.directory, el.topo).remove_worker(el.topo, name, report)
    topo = replace(el.topo, groups=tuple(g for g in el.topo.groups if g.name != name))
    topology.save(el.directory, topo)
    el.nodes.close()
    el.reload_topology()
    report(f"{name}: removed")

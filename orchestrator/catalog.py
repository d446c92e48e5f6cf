"""Reading the cluster's state: the coordinator catalog and what exists on each node."""

from __future__ import annotations

import psycopg

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.nodeconn import NodeConnections
from orchestrator.planner import NodeSpec, ObservedCluster

FRAGMENTS_SQL = """
SELECT f.fragment_id, f.range_from, f.range_to, p.node_name, f.time_interval::text
  FROM buildsmart.fragments f
  JOIN buildsmart.placements p ON p.fragment_id = f.fragment_id AND p.state = 'active'
 WHERE f.logicalrelid = 'public.readings'::regclass
 ORDER BY f.fragment_id
"""


def has_catalog(conn: psycopg.Connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = %s", (EXTENSION_NAME,))
        ext = cur.fetchone() is not None
        cur.execute("SELECT pg_catalog.to_regclass('public.readings') IS NOT NULL")
        row = cur.fetchone()
    return ext and bool(row and row[0])


def load_fragments(conn: psycopg.Connection) -> tuple[Fragment, ...]:
    with conn.cursor() as cur:
        cur.execute(FRAGMENTS_SQL)
        return tuple(Fragment(fid, lo, hi, node, iv) for fid, lo, hi, node, iv in cur.fetchall())


def _extension_ok(conn: psycopg.Connection, coordinator: bool = False) -> bool:
    """The current extension version is installed (and, on the coordinator, its C module is
    preloaded into every session of the database)."""
    with conn.cursor() as cur:
        cur.execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = %s", (EXTENSION_NAME,))
        row = cur.fetchone()
        if row is None or row[0] != EXTENSION_VERSION:
            return False
        if not coordinator:
            return True
        cur.execute(
            "SELECT 1 FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database() AND s.setrole = 0 AND %s = ANY (s.setconfig)",
            (f"session_preload_libraries={EXTENSION_NAME}",),
        )
        return cur.fetchone() is not None


def _worker_tables(conn: psycopg.Connection) -> set[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'p' AND NOT c.relispartition",
            (SHARD_SCHEMA,),
        )
        return {r[0] for r in cur.fetchall()}


def _old_triggers(conn: psycopg.Connection) -> set[str]:
    """Fragment tables whose latest-wins trigger is still the 0.1 PL/pgSQL function."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_trigger t "
            "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace "
            "WHERE n.nspname = %s AND c.relkind = 'p' AND NOT c.relispartition AND t.tgname = 'readings_replace' "
            "AND NOT t.tgisinternal AND (pn.nspname, p.proname) <> ('buildsmart', 'replace_existing')",
            (SHARD_SCHEMA,),
        )
        return {r[0] for r in cur.fetchall()}


def observe(nodes: NodeConnections) -> ObservedCluster:
    """Snapshot the catalog, foreign servers and fragment tables of every node."""
    coord = nodes.coordinator
    coordinator_name = nodes.topology.coordinator.name
    ext_ok = {
        name for name in (g.name for g in nodes.topology.groups) if _extension_ok(nodes.get(name), name == coordinator_name)
    }
    # an older extension still has a readable catalog (an upgrade); only a new coordinator has none
    if not has_catalog(coord):
        worker_tables = {
            (w.name, t) for w in nodes.topology.workers if w.name in ext_ok for t in _worker_tables(nodes.get(w.name))
        }
        return ObservedCluster(extension_ok=frozenset(ext_ok), worker_tables=frozenset(worker_tables))
    with coord.cursor() as cur:
        cur.execute("SELECT name, role, hosts, ports, dbname FROM buildsmart.nodes")
        catalog_nodes = {r[0]: NodeSpec(*r) for r in cur.fetchall()}
        cur.execute(
            "SELECT s.srvname, "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'host=%%'), "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'port=%%'), "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'dbname=%%') "
            "FROM pg_catalog.pg_foreign_server s"
        )
        servers = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
        cur.execute(
            "SELECT s.srvname FROM pg_catalog.pg_user_mapping um "
            "JOIN pg_catalog.pg_foreign_server s ON s.oid = um.umserver WHERE um.umuser = 0"
        )
        mappings = {r[0] for r in cur.fetchall()}
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'f' AND c.relispartition",
            (SHARD_SCHEMA,),
        )
        partitions = {r[0] for r in cur.fetchall()}
    worker_tables = set()
    old_triggers = set()
    for worker in nodes.topology.workers:
        # also on workers whose extension is older: the tables exist, only their trigger changes
        worker_tables |= {(worker.name, t) for t in _worker_tables(nodes.get(worker.name))}
        old_triggers |= {(worker.name, t) for t in _old_triggers(nodes.get(worker.name))}
    return ObservedCluster(
        extension_ok=frozenset(ext_ok),
        app_schema=True,
        nodes=catalog_nodes,
        servers=servers,
        user_mappings=frozenset(mappings),
        fragments=load_fragments(coord),
        worker_tables=frozenset(worker_tables),
        old_triggers=frozenset(old_triggers),
        coordinator_partitions=frozenset(partitions),
    )

"""Worker- and coordinator-side building blocks shared by moves and splits: fragment tables,
their time partitions and extra indexes, row checksums, and the coordinator partition switch."""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from orchestrator.executor import attach_partition_sql, coordinator_columns, fragment_table_ddl
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.nodeconn import NodeConnections

log = logging.getLogger(__name__)


def table(shard: str) -> sql.Identifier:
    return sql.Identifier(SHARD_SCHEMA, shard)


def regclass(shard: str) -> str:
    return f"{SHARD_SCHEMA}.{shard}"


def table_exists(conn: psycopg.Connection, shard: str) -> bool:
    row = conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (regclass(shard),)).fetchone()
    return bool(row and row[0])


def create_fragment_table(nodes: NodeConnections, frag: Fragment, conn: psycopg.Connection) -> None:
    """A fragment table with the coordinator's current columns (so migrations reach new fragments)."""
    columns = coordinator_columns(nodes.coordinator)
    with conn.transaction():
        for stmt in fragment_table_ddl(frag, columns):
            conn.execute(stmt)
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                table(frag.shard_name), sql.Identifier(nodes.creds.app_user)
            )
        )
    log.info("created fragment table %s %s on %s", frag.shard_name, frag.describe_range(), frag.node)


def mirror_time_partitions(
    src: psycopg.Connection, src_shard: str, dst: psycopg.Connection, dst_shard: str, interval: str
) -> int:
    """Give the destination exactly the source's time partitions (no others), so the two can be
    verified partition by partition (orchestrator.elastic.verify)."""
    starts = [
        r[0]
        for r in src.execute(
            "SELECT substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \\(''([^'']+)''\\)')::timestamptz "
            "FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid "
            "WHERE t.isleaf AND t.level = 1 AND c.relpartbound IS NOT NULL",
            (regclass(src_shard),),
        ).fetchall()
        if r[0] is not None
    ]
    row = dst.execute(
        "SELECT coalesce(sum(buildsmart.ensure_time_partitions(%s::regclass, %s::interval, s, s)), 0) "
        "FROM unnest(%s::timestamptz[]) s",
        (regclass(dst_shard), interval, starts),
    ).fetchone()
    return int(row[0]) if row else 0


def copy_indexes(src: psycopg.Connection, src_shard: str, dst: psycopg.Connection, dst_shard: str) -> int:
    """Indexes added by migrations (everything but the primary key), renamed for the destination."""
    rows = src.execute(
        "SELECT c.relname, pg_catalog.pg_get_indexdef(i.indexrelid) FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass AND NOT i.indisprimary",
        (regclass(src_shard),),
    ).fetchall()
    made = 0
    for name, ddl in rows:
        new_name = name.replace(src_shard, dst_shard, 1)
        exists = dst.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (f"{SHARD_SCHEMA}.{new_name}",)).fetchone()
        if exists and exists[0]:
            continue
        # A partitioned index prints as "ON ONLY parent"; created without ONLY it recurses.
        ddl = ddl.replace(" ON ONLY ", " ON ", 1)
        ddl = ddl.replace(f"INDEX {name} ON", f"INDEX {new_name} ON", 1).replace(
            f"{SHARD_SCHEMA}.{src_shard} ", f"{SHARD_SCHEMA}.{dst_shard} ", 1
        )
        dst.execute(ddl.encode())
        made += 1
    return made


def vacuum_if_not_empty(conn: psycopg.Connection, shard: str) -> bool:
    """VACUUM (ANALYZE) a fragment table that holds rows: gives back unused pages at the end of its
    files and refreshes its statistics. An EMPTY one is left alone: statistics saying "no rows"
    would make the replace trigger's cached generic DELETE plan a sequential scan, which then
    stays while the table fills (quadratic; measured: a 150k-row insert ran for many minutes)."""
    row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table(shard))).fetchone()
    if not (row and row[0]):
        return False
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table(shard)))
    return True


def server_of(coord: psycopg.Connection, node: str) -> str:
    row = coord.execute("SELECT server_name FROM buildsmart.nodes WHERE name = %s", (node,)).fetchone()
    if row is None or row[0] is None:
        raise psycopg.errors.UndefinedObject(f"node {node} has no foreign server")
    return str(row[0])


def replace_coordinator_partitions(
    nodes: NodeConnections, old_shards: list[str], new_fragments: list[Fragment], remote_names: dict[str, str] | None = None
) -> None:
    """Inside the caller's coordinator transaction: detach and drop the old foreign partitions,
    attach the new ones. Readers see either all old or all new partitions, never both."""
    coord = nodes.coordinator
    for shard in old_shards:
        coord.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent_of(coord, shard), table(shard)))
        coord.execute(sql.SQL("DROP FOREIGN TABLE {}").format(table(shard)))
    for frag in new_fragments:
        coord.execute(attach_partition_sql(frag, server_of(coord, frag.node)))
        remote = (remote_names or {}).get(frag.shard_name)
        if remote is not None:
            set_remote_name(coord, frag.shard_name, remote)
        coord.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                table(frag.shard_name), sql.Identifier(nodes.creds.app_user)
            )
        )


def parent_of(coord: psycopg.Connection, shard: str) -> sql.Identifier:
    """The coordinator table a foreign partition is attached to (readings or a time group)."""
    row = coord.execute(
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhparent "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE i.inhrelid = %s::regclass",
        (regclass(shard),),
    ).fetchone()
    if row is None:
        raise psycopg.errors.UndefinedTable(f"{regclass(shard)} is not attached to any table")
    return sql.Identifier(str(row[0]), str(row[1]))


def set_remote_name(coord: psycopg.Connection, shard: str, remote: str) -> None:
    """Point a coordinator foreign table at another remote relation (metadata only, transactional)."""
    coord.execute(sql.SQL("ALTER FOREIGN TABLE {} OPTIONS (SET table_name {})").format(table(shard), sql.Literal(remote)))


def remote_name(coord: psycopg.Connection, shard: str) -> str | None:
    row = coord.execute(
        "SELECT split_part(o, '=', 2) FROM pg_catalog.pg_foreign_table ft, unnest(ft.ftoptions) o "
        "WHERE ft.ftrelid = pg_catalog.to_regclass(%s) AND o LIKE 'table_name=%%'",
        (regclass(shard),),
    ).fetchone()
    return None if row is None else str(row[0])

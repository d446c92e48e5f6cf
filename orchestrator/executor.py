"""Apply setup steps. One registered implementation per step type (alembic's ops-as-data style);
each step runs in its own transaction on the node(s) it touches and is logged with its sentence."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from orchestrator import catalog, extension, roles
from orchestrator.connections import LIVENESS_PARAMS, tls_params
from orchestrator.exceptions import NodeError
from orchestrator.fragments import DISTRIBUTED_TABLE, SHARD_SCHEMA, Fragment
from orchestrator.nodeconn import NodeConnections
from orchestrator.planner import (
    AttachCoordinatorPartition,
    CreateAppSchema,
    CreateWorkerFragment,
    EnsureEnergySchema,
    EnsureExtension,
    EnsureForeignServer,
    EnsureUserMapping,
    RecordLayoutSource,
    RegisterFragment,
    RegisterNode,
    Step,
    UpgradeFragmentTrigger,
)
from orchestrator.sqlbuild import SQL_DIR

log = logging.getLogger(__name__)

FDW_OPTIONS = {
    "async_capable": "true",
    "batch_size": "1000",
    "fetch_size": "10000",
    "extensions": "buildsmart",
    "target_session_attrs": "read-write",
    # Not applied by the coordinator's backends: they connect asynchronously (libpqsrv_connect),
    # and libpq enforces connect_timeout only in its blocking connect. A connection attempt to a
    # lost host ends with tcp_user_timeout (below); fdwroute.py keeps the lost host out of the way.
    "connect_timeout": "10",
}
# The coordinator's sessions on workers (postgres_fdw, the distributed executor, the COPY router)
# give up on a worker host that acknowledges nothing for 3 s: a statement in flight on a lost host,
# and a connection attempt to it (SYN retransmissions obey it too). It is also the longest a worker
# may keep its receive window shut (this kernel cuts a zero window after tcp_user_timeout): the
# coordinator sends one message and waits for its answer, except in a COPY through the coordinator,
# where a worker backend that reads nothing for 3 s (a lock wait) fails the COPY. The orchestrator's
# own connections (ingest streams into workers) keep LIVENESS_PARAMS' 30 s. docs/hosts.md.
# On one host none of this fires (a lost member refuses connections at once): local clusters keep
# LIVENESS_PARAMS, so their COPYs through the coordinator are never cut by it.
FDW_LIVENESS = {**LIVENESS_PARAMS, "tcp_user_timeout": "3000"}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def fdw_liveness(hosts: str) -> dict[str, str]:
    """Liveness options of a worker's foreign server: FDW_LIVENESS when a member lives on another
    host, LIVENESS_PARAMS when every member is on loopback (the local runtimes)."""
    return LIVENESS_PARAMS if set(hosts.split(",")) <= LOOPBACK_HOSTS else FDW_LIVENESS


# Partitions made ahead of time when a fragment is created: one interval back, three ahead.
PREMADE_BEHIND, PREMADE_AHEAD = 1, 3

S = TypeVar("S", bound=Step)
Impl = Callable[[NodeConnections, Any], None]
_IMPLEMENTATIONS: dict[type[Step], Impl] = {}


def implements(step_type: type[S]) -> Callable[[Callable[[NodeConnections, S], None]], Callable[[NodeConnections, S], None]]:
    def register(fn: Callable[[NodeConnections, S], None]) -> Callable[[NodeConnections, S], None]:
        _IMPLEMENTATIONS[step_type] = fn
        return fn

    return register


def apply(nodes: NodeConnections, steps: Iterable[Step], on_step: Callable[[Step], None] | None = None) -> int:
    done = 0
    for step in steps:
        impl = _IMPLEMENTATIONS[type(step)]
        log.info("applying: %s", step.describe())
        try:
            impl(nodes, step)
        except psycopg.Error as exc:
            raise NodeError(f"could not {step.describe()}: {exc}") from exc
        if on_step:
            on_step(step)
        done += 1
    return done


@implements(EnsureExtension)
def _ensure_extension(nodes: NodeConnections, step: EnsureExtension) -> None:
    conn = nodes.get(step.node)
    with conn.transaction():
        extension.ensure_extension(conn, step.node)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SHARD_SCHEMA)))
        dbname = nodes.topology.group(step.node).dbname
        if step.node == nodes.topology.coordinator.name:
            extension.preload_in_database(conn, dbname)
        for setting in ("enable_partitionwise_aggregate", "enable_partitionwise_join"):
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = on").format(sql.Identifier(dbname), sql.Identifier(setting)))


@implements(CreateAppSchema)
def _create_app_schema(nodes: NodeConnections, step: CreateAppSchema) -> None:
    conn = nodes.coordinator
    ddl = (SQL_DIR / "app" / "coordinator.sql").read_text()
    with conn.transaction():
        conn.execute(ddl.encode())
        role = sql.Identifier(nodes.creds.app_user)
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.readings, public.buildings, public.devices TO {}").format(
                role
            )
        )
        conn.execute(sql.SQL("GRANT SELECT ON public.latest_readings TO {}").format(role))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SHARD_SCHEMA), role))
        conn.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}").format(
                sql.Identifier(SHARD_SCHEMA), role
            )
        )


@implements(EnsureEnergySchema)
def _ensure_energy_schema(nodes: NodeConnections, step: EnsureEnergySchema) -> None:
    from orchestrator.energy import schema  # the energy model owns its DDL and grants

    schema.ensure_coordinator_schema(nodes.coordinator, nodes.creds.app_user)


@implements(RegisterNode)
def _register_node(nodes: NodeConnections, step: RegisterNode) -> None:
    n = step.node
    server = n.server_name if n.role == "worker" else None
    nodes.coordinator.execute(
        "INSERT INTO buildsmart.nodes (name, role, hosts, ports, dbname, server_name) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, hosts = EXCLUDED.hosts, ports = EXCLUDED.ports, "
        "dbname = EXCLUDED.dbname, server_name = EXCLUDED.server_name",
        (n.name, n.role, n.hosts, n.ports, n.dbname, server),
    )


def _server_options(pairs: dict[str, str], verb: str = "") -> sql.Composable:
    prefix = sql.SQL(verb + " ") if verb else sql.SQL("")
    return sql.SQL(", ").join(sql.SQL("{}{} {}").format(prefix, sql.Identifier(k), sql.Literal(v)) for k, v in pairs.items())


@implements(EnsureForeignServer)
def _ensure_foreign_server(nodes: NodeConnections, step: EnsureForeignServer) -> None:
    n = step.node
    address = {"host": n.hosts, "port": n.ports, "dbname": n.dbname}
    server = sql.Identifier(n.server_name)
    if step.create:
        # the coordinator verifies every worker it connects to against the cluster CA (runtime/tls.py)
        tls = tls_params(nodes.creds.ca_file)
        stmt = sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({})").format(
            server, _server_options({**address, **FDW_OPTIONS, **tls, **fdw_liveness(n.hosts)})
        )
    else:
        # Repointing a server is an ALTER, no foreign table changes: queries follow at once.
        stmt = sql.SQL("ALTER SERVER {} OPTIONS ({})").format(server, _server_options(address, "SET"))
    nodes.coordinator.execute(stmt)


def foreign_server_address(coord: psycopg.Connection, server: str) -> tuple[str, str] | None:
    """(host, port) options of a foreign server as stored (None: no such server)."""
    row = coord.execute(
        "SELECT (SELECT substr(o, 6) FROM unnest(s.srvoptions) o WHERE o LIKE 'host=%%'), "
        " (SELECT substr(o, 6) FROM unnest(s.srvoptions) o WHERE o LIKE 'port=%%') "
        "FROM pg_catalog.pg_foreign_server s WHERE s.srvname = %s",
        (server,),
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else None


def point_foreign_server(coord: psycopg.Connection, server: str, hosts: str, ports: str) -> None:
    """Set a foreign server's host list (fdwroute: the current primary first). Sessions reconnect
    when their transaction ends (postgres_fdw) or when idle (the distributed executor)."""
    coord.execute(
        sql.SQL("ALTER SERVER {} OPTIONS ({})").format(
            sql.Identifier(server), _server_options({"host": hosts, "port": ports}, "SET")
        )
    )


@implements(EnsureUserMapping)
def _ensure_user_mapping(nodes: NodeConnections, step: EnsureUserMapping) -> None:
    """Every coordinator role reaches the worker as the fdw role. Locally its password comes from
    the servers' passfile, so no catalog holds it; ``password_required 'false'`` (settable by a
    superuser only) lets non-superusers use a mapping without a password, and the distributed
    planner still refuses a worker that does not ask for one (remote.c)."""
    creds, server = nodes.creds, sql.Identifier(step.node.server_name)
    coord = nodes.coordinator
    with roles.unlogged(coord):
        coord.execute(sql.SQL("DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER {}").format(server))
        has_passfile = coord.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server s, unnest(s.srvoptions) o "
            "WHERE s.srvname = %s AND o LIKE 'passfile=%%')",
            (step.node.server_name,),
        ).fetchone() == (True,)
        if step.mapping.passfile is not None:
            verb = sql.SQL("SET" if has_passfile else "ADD")
            coord.execute(
                sql.SQL("ALTER SERVER {} OPTIONS ({} passfile {})").format(server, verb, sql.Literal(step.mapping.passfile))
            )
            coord.execute(
                sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER {} OPTIONS (user {}, password_required 'false')").format(
                    server, sql.Literal(step.mapping.user)
                )
            )
        else:
            if has_passfile:
                coord.execute(sql.SQL("ALTER SERVER {} OPTIONS (DROP passfile)").format(server))
            coord.execute(
                sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER {} OPTIONS (user {}, password {})").format(
                    server, sql.Literal(step.mapping.user), sql.Literal(creds.fdw_password)
                )
            )
        coord.execute(sql.SQL("GRANT USAGE ON FOREIGN SERVER {} TO {}").format(server, sql.Identifier(creds.app_user)))


def coordinator_columns(conn: psycopg.Connection, relation: str = f"public.{DISTRIBUTED_TABLE}") -> list[tuple[str, str, bool]]:
    """(name, type with collation, not null) of the distributed table, from the coordinator."""
    cur = conn.execute(
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) "
        "  || CASE WHEN a.attcollation <> t.typcollation THEN ' COLLATE ' || quote_ident(co.collname) ELSE '' END, "
        "  a.attnotnull "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid "
        "LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (relation,),
    )
    return [(r[0], r[1], r[2]) for r in cur.fetchall()]


def fragment_table_ddl(frag: Fragment, columns: list[tuple[str, str, bool]]) -> list[sql.Composed]:
    """DDL of a worker fragment: time-partitioned, keyed on (building, meter, ts), range-checked."""
    table = sql.Identifier(SHARD_SCHEMA, frag.shard_name)
    cols = [
        sql.SQL("{} {}{}").format(sql.Identifier(name), sql.SQL(typ), sql.SQL(" NOT NULL" if notnull else ""))
        for name, typ, notnull in columns
    ]
    check = range_check(frag)
    if check is not None:
        cols.append(sql.SQL("CONSTRAINT {} CHECK ({})").format(sql.Identifier(f"{frag.shard_name}_range"), check))
    cols.append(sql.SQL("CONSTRAINT {} PRIMARY KEY (building, meter, ts)").format(sql.Identifier(f"{frag.shard_name}_pkey")))
    return [
        sql.SQL("CREATE TABLE {} ({}) PARTITION BY RANGE (ts)").format(table, sql.SQL(", ").join(cols)),
        sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(
            sql.Identifier(SHARD_SCHEMA, f"{frag.shard_name}_default"), table
        ),
        *replace_trigger_ddl(frag.shard_name),
        sql.SQL(
            "SELECT buildsmart.ensure_time_partitions({}::regclass, {}::interval, "
            "now() - {} * {}::interval, now() + {} * {}::interval)"
        ).format(
            sql.Literal(f"{SHARD_SCHEMA}.{frag.shard_name}"),
            sql.Literal(frag.time_interval),
            sql.Literal(PREMADE_BEHIND),
            sql.Literal(frag.time_interval),
            sql.Literal(PREMADE_AHEAD),
            sql.Literal(frag.time_interval),
        ),
    ]


def range_check(frag: Fragment) -> sql.Composable | None:
    """The CHECK of a worker fragment: its building range and, in a time group, its time range."""
    checks: list[sql.Composable] = []
    if frag.range_from is not None:
        checks.append(sql.SQL("building >= {}").format(sql.Literal(frag.range_from)))
    if frag.range_to is not None:
        checks.append(sql.SQL("building < {}").format(sql.Literal(frag.range_to)))
    if frag.ts_from is not None:
        checks.append(sql.SQL("ts >= {}::timestamptz").format(sql.Literal(frag.ts_from.isoformat())))
    if frag.ts_to is not None:
        checks.append(sql.SQL("ts < {}::timestamptz").format(sql.Literal(frag.ts_to.isoformat())))
    return sql.SQL(" AND ").join(checks) if checks else None


def replace_function(shard: str) -> sql.Identifier:
    """The PL/pgSQL replace function of a fragment made by release 0.1 (dropped on upgrade)."""
    return sql.Identifier(SHARD_SCHEMA, f"{shard}_replace")


REPLACE_TRIGGER = "readings_replace"
REPLACE_FUNCTION = "buildsmart.replace_existing"


def replace_trigger_ddl(shard: str) -> list[sql.Composed]:
    """Latest value wins for plain INSERT/COPY (SQL clients through the coordinator): a BEFORE
    INSERT row trigger deletes a stored row with the same key. The function is the extension's C
    trigger (sql/src/replace_trigger.c): it probes the primary key of the time partition the row
    goes into and deletes only when a row is there. The orchestrator's own loader writes in bulk
    and skips it (session_replication_role = replica)."""
    return [
        sql.SQL("CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION buildsmart.replace_existing()").format(
            sql.Identifier(REPLACE_TRIGGER), sql.Identifier(SHARD_SCHEMA, shard)
        ),
    ]


def upgrade_replace_trigger_ddl(shard: str) -> list[sql.Composed]:
    """Swap a 0.1 fragment's PL/pgSQL trigger for the C one (one transaction on the worker)."""
    return [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(REPLACE_TRIGGER), sql.Identifier(SHARD_SCHEMA, shard)),
        sql.SQL("DROP FUNCTION IF EXISTS {}()").format(replace_function(shard)),
        *replace_trigger_ddl(shard),
    ]


def drop_fragment_sql(shard: str, if_exists: bool = False) -> list[sql.Composed]:
    """Drop a worker fragment table with its time partitions and its replace function."""
    exists = sql.SQL(" IF EXISTS" if if_exists else "")
    return [
        sql.SQL("DROP TABLE{} {}").format(exists, sql.Identifier(SHARD_SCHEMA, shard)),
        sql.SQL("DROP FUNCTION IF EXISTS {}()").format(replace_function(shard)),
    ]


@implements(CreateWorkerFragment)
def _create_worker_fragment(nodes: NodeConnections, step: CreateWorkerFragment) -> None:
    columns = coordinator_columns(nodes.coordinator)
    worker = nodes.get(step.fragment.node)
    with worker.transaction():
        for stmt in fragment_table_ddl(step.fragment, columns):
            worker.execute(stmt)
        roles.grant_fragment(worker, roles.NodeKind.WORKER, nodes.creds, sql.Identifier(SHARD_SCHEMA, step.fragment.shard_name))


@implements(UpgradeFragmentTrigger)
def _upgrade_fragment_trigger(nodes: NodeConnections, step: UpgradeFragmentTrigger) -> None:
    worker = nodes.get(step.fragment.node)
    with worker.transaction():
        for stmt in upgrade_replace_trigger_ddl(step.fragment.shard_name):
            worker.execute(stmt)


@implements(RegisterFragment)
def _register_fragment(nodes: NodeConnections, step: RegisterFragment) -> None:
    coord = nodes.coordinator
    with coord.transaction():
        catalog.insert_fragment(coord, step.fragment)


def _bound(value: str | None, infinite: str) -> sql.Composable:
    return sql.SQL(infinite) if value is None else sql.SQL("({})").format(sql.Literal(value))


def _ts_bound(value: datetime | None, infinite: str) -> sql.Composable:
    return sql.SQL(infinite) if value is None else sql.SQL("({})").format(sql.Literal(value.isoformat()))


def partition_parent(frag: Fragment) -> sql.Identifier:
    """The coordinator table a fragment's foreign table is a partition of: readings, or the time
    group table of its building range."""
    if frag.time_group is None:
        return sql.Identifier("public", DISTRIBUTED_TABLE)
    return sql.Identifier(SHARD_SCHEMA, frag.time_group)


def partition_bounds(frag: Fragment) -> sql.Composed:
    """FOR VALUES of the fragment under its parent: building bounds, or time bounds in a group."""
    values = sql.SQL("FOR VALUES FROM {} TO {}")
    if frag.time_group is None:
        return values.format(_bound(frag.range_from, "(MINVALUE)"), _bound(frag.range_to, "(MAXVALUE)"))
    return values.format(_ts_bound(frag.ts_from, "(MINVALUE)"), _ts_bound(frag.ts_to, "(MAXVALUE)"))


def time_group_sql(group: str, range_from: str | None, range_to: str | None) -> list[sql.Composed]:
    """A time group on the coordinator: a table with readings' columns, partitioned by time, as the
    partition of readings for one building range (its partitions are the fragments' foreign tables)."""
    table = sql.Identifier(SHARD_SCHEMA, group)
    return [
        sql.SQL("CREATE TABLE {} (LIKE public.readings) PARTITION BY RANGE (ts)").format(table),
        sql.SQL("ALTER TABLE public.readings ATTACH PARTITION {} FOR VALUES FROM {} TO {}").format(
            table, _bound(range_from, "(MINVALUE)"), _bound(range_to, "(MAXVALUE)")
        ),
    ]


def attach_partition_sql(frag: Fragment, server_name: str) -> sql.Composed:
    return sql.SQL("CREATE FOREIGN TABLE {} PARTITION OF {} {} SERVER {} OPTIONS (schema_name {}, table_name {})").format(
        sql.Identifier(SHARD_SCHEMA, frag.shard_name),
        partition_parent(frag),
        partition_bounds(frag),
        sql.Identifier(server_name),
        sql.Literal(SHARD_SCHEMA),
        sql.Literal(frag.shard_name),
    )


@implements(AttachCoordinatorPartition)
def _attach_partition(nodes: NodeConnections, step: AttachCoordinatorPartition) -> None:
    coord = nodes.coordinator
    with coord.transaction():
        server = coord.execute("SELECT server_name FROM buildsmart.nodes WHERE name = %s", (step.fragment.node,)).fetchone()
        if server is None or server[0] is None:
            raise NodeError(f"node {step.fragment.node} has no foreign server")
        coord.execute(attach_partition_sql(step.fragment, server[0]))
        table = sql.Identifier(SHARD_SCHEMA, step.fragment.shard_name)
        roles.grant_fragment(coord, roles.NodeKind.COORDINATOR, nodes.creds, table)


@implements(RecordLayoutSource)
def _record_layout_source(nodes: NodeConnections, step: RecordLayoutSource) -> None:
    catalog.set_auto_layout(nodes.coordinator, step.auto)

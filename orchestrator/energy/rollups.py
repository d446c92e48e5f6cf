"""Rollups on the workers, next to the data, distributed like readings.

Layout: next to each fragment table bsdata.<shard> on its worker, bsdata.<shard>_hourly and
bsdata.<shard>_daily (keyed by building, meter, ts = bucket start); on the coordinator
public.readings_hourly / readings_daily are partitioned by building range with one foreign
partition per fragment (a time group gets a table partitioned by ts, as readings does), so a
query on one building reads one worker and GROUP BY building runs on the workers.

Incremental upkeep: writes note changed (building, meter, time range) in buildsmart.rollup_changes
(the loader in each batch's transaction, a statement trigger for SQL); the extension's
refresh_rollups() consumes them on the worker and recomputes only the local days they touch.

Fragment operations (moves, splits, time splits, the first-load layout) change readings' fragments;
:func:`reconcile` makes the rollups follow them: it builds the rollups of a fragment table they
were not built from (a moved or new one), then switches the coordinator's rollup partitions in one
transaction under an exclusive lock of the two rollup tables (readers wait a few milliseconds),
trimming the rows a split moved away from the narrowed fragment inside that lock, and finally
drops rollup tables no fragment uses. Until then queries read the previous rollups: complete
but not refreshed for the moved range.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import psycopg
from psycopg import sql

from orchestrator import catalog
from orchestrator.connections import BULK_LOAD_APP, application_name
from orchestrator.executor import coordinator_columns
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.nodeconn import NodeConnections

log = logging.getLogger(__name__)

Kind = Literal["hourly", "daily"]
KINDS: tuple[Kind, ...] = ("hourly", "daily")
TRIGGERS = {  # name -> (event, transition tables)
    "rollup_changes_ins": ("INSERT", "REFERENCING NEW TABLE AS new_rows"),
    "rollup_changes_upd": ("UPDATE", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    "rollup_changes_del": ("DELETE", "REFERENCING OLD TABLE AS old_rows"),
}
LOCK_TIMEOUT = "5s"


def rollup_table(shard: str, kind: Kind) -> str:
    return f"{shard}_{kind}"


def rollup_tables(conn: psycopg.Connection, shard: str) -> list[str]:
    """The rollup tables of a fragment that exist on this worker (`buildsmart check` reads them)."""
    names = [rollup_table(shard, k) for k in KINDS]
    rows = conn.execute(
        "SELECT n FROM unnest(%s::text[]) AS n WHERE pg_catalog.to_regclass(%s || '.' || pg_catalog.quote_ident(n)) IS NOT NULL",
        (names, SHARD_SCHEMA),
    ).fetchall()
    return [str(r[0]) for r in rows]


def coordinator_table(kind: Kind) -> sql.Identifier:
    return sql.Identifier("public", f"readings_{kind}")


# ---------------------------------------------------------------- worker DDL


def worker_tables_ddl(shard: str, columns: dict[Kind, list[tuple[str, str, bool]]]) -> list[sql.Composed]:
    """The rollup tables of a fragment, with the coordinator tables' columns."""
    out = []
    for kind in KINDS:
        name = rollup_table(shard, kind)
        cols = [
            sql.SQL("{} {}{}").format(sql.Identifier(n), sql.SQL(t), sql.SQL(" NOT NULL" if nn else ""))
            for n, t, nn in columns[kind]
        ]
        cols.append(sql.SQL("CONSTRAINT {} PRIMARY KEY (building, meter, ts)").format(sql.Identifier(f"{name}_pkey")))
        table = sql.Identifier(SHARD_SCHEMA, name)
        out.append(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, sql.SQL(", ").join(cols)))
        # all buildings of one month (top-N, league tables) or one hour, without reading the rest
        by_time = sql.SQL("month" if kind == "daily" else "ts")
        out.append(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}, building)").format(sql.Identifier(f"{name}_time"), table, by_time)
        )
        if kind == "daily":
            # one building's days of a year (the daily profile) without reading its other years: the
            # primary key leads with meter, and a building's rows are spread over the table
            out.append(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (building, day)").format(sql.Identifier(f"{name}_day"), table)
            )
    return out


def change_trigger_ddl(shard: str, name: str) -> sql.Composed:
    event, transition = TRIGGERS[name]
    return sql.SQL("CREATE TRIGGER {} AFTER {} ON {} {} FOR EACH STATEMENT EXECUTE FUNCTION buildsmart.note_changes({})").format(
        sql.Identifier(name), sql.SQL(event), sql.Identifier(SHARD_SCHEMA, shard), sql.SQL(transition), sql.Literal(shard)
    )


def _missing_triggers(conn: psycopg.Connection, shard: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_catalog.pg_trigger WHERE tgrelid = pg_catalog.to_regclass(%s) AND NOT tgisinternal",
        (f"{SHARD_SCHEMA}.{shard}",),
    ).fetchall()
    have = {r[0] for r in rows}
    return [t for t in TRIGGERS if t not in have]


def _fragment_oid(conn: psycopg.Connection, shard: str) -> int | None:
    row = conn.execute("SELECT pg_catalog.to_regclass(%s)::oid", (f"{SHARD_SCHEMA}.{shard}",)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


@dataclass(frozen=True)
class BuiltState:
    shard: str
    fragment_oid: int
    range_from: str | None
    range_to: str | None
    ts_from: datetime | None
    ts_to: datetime | None
    built_at: datetime
    refreshed_at: datetime | None


def _state(conn: psycopg.Connection, shard: str) -> BuiltState | None:
    row = conn.execute(
        "SELECT shard, fragment_oid, range_from, range_to, ts_from, ts_to, built_at, refreshed_at "
        "FROM buildsmart.rollup_state WHERE shard = %s",
        (shard,),
    ).fetchone()
    return None if row is None else BuiltState(str(row[0]), int(row[1]), *row[2:])


def follows_layout(conn: psycopg.Connection, frag: Fragment) -> bool:
    """Whether this worker's rollups of ``frag`` were built from its current table and range. After a
    split or move they follow once the rollups task has trimmed or rebuilt them (until then they
    are not attached where they would be wrong, and `check` leaves them alone)."""
    state = _state(conn, frag.shard_name)
    return (
        state is not None
        and state.fragment_oid == _fragment_oid(conn, frag.shard_name)
        and (state.range_from, state.range_to, state.ts_from, state.ts_to)
        == (frag.range_from, frag.range_to, frag.ts_from, frag.ts_to)
    )


# ---------------------------------------------------------------- refresh


@dataclass(frozen=True)
class FragmentRefresh:
    shard: str
    node: str
    changes: int
    ranges: int
    hourly_rows: int
    daily_rows: int
    full: bool


ANALYZE_AFTER_ROWS = 50_000


def refresh_fragment(conn: psycopg.Connection, frag: Fragment, full: bool = False) -> FragmentRefresh:
    """One refresh (or rebuild) of a fragment's rollups, in one worker transaction."""
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '30s'")
        # the lock refresh_rollups() takes, before a rebuild's DELETE: one refresh of a fragment at a time
        conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(1112755530, pg_catalog.hashtext(%s))", (frag.shard_name,))
        if full:
            for kind in KINDS:
                conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(SHARD_SCHEMA, rollup_table(frag.shard_name, kind))))
        row = conn.execute(
            "SELECT changes, ranges, hourly_rows, daily_rows FROM buildsmart.refresh_rollups(%s, %s, %s)",
            (frag.shard_name, full, frag.ts_from),
        ).fetchone()
    assert row is not None
    result = FragmentRefresh(frag.shard_name, frag.node, int(row[0]), int(row[1]), int(row[2]), int(row[3]), full)
    if full or result.hourly_rows + result.daily_rows >= ANALYZE_AFTER_ROWS:
        # a catch-up after a bulk load changes most of the table at once: plan the dashboards'
        # queries with its new statistics now rather than when autovacuum, busy with the freshly
        # loaded readings, gets to it (one run answered a yearly profile in 4.2 ms instead of 0.9)
        for kind in KINDS:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(SHARD_SCHEMA, rollup_table(frag.shard_name, kind))))
    if result.changes:
        log.info(
            "%s rollups of %s on %s: %d change(s), %d meter range(s), %d hourly and %d daily row(s) written",
            "rebuilt" if full else "refreshed", frag.shard_name, frag.node, result.changes, result.ranges,
            result.hourly_rows, result.daily_rows,
        )  # fmt: skip
    return result


def defer_for_bulk_load(loading: bool, oldest_change_age_s: float, max_lag_s: float | None) -> bool:
    """Whether to leave a fragment's waiting changes for later (pure): while a bulk load (a file,
    not a stream) writes on its worker, unless its oldest waiting change is ``max_lag_s`` old.
    Why: a refresh during a load recomputes hourly rows about as many as the load writes, on the
    same cores and through the same replicas (measured: with a refresh share of 15%, single
    Cambridge loads took 8-32% longer); the same work after the load costs the load nothing, and the
    dashboards lag the load by at most ``max_lag_s`` plus the catch-up."""
    return max_lag_s is not None and loading and oldest_change_age_s < max_lag_s


def bulk_load_running(conn: psycopg.Connection) -> bool:
    """Whether a bulk load's session is open on this worker (see ingest/writer.py)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE application_name LIKE %s)",
        (application_name(f"{BULK_LOAD_APP}:%"),),
    ).fetchone()
    return bool(row and row[0])


def refresh(
    nodes: NodeConnections,
    fragments: Sequence[Fragment] | None = None,
    full: bool = False,
    defer_while_loading_s: float | None = None,
    deferred: list[str] | None = None,
) -> list[FragmentRefresh]:
    """Refresh every fragment whose rollups are built (``full``: rebuild them from raw rows).
    With ``defer_while_loading_s`` (the task), fragments on a worker where a bulk load writes wait
    (see :func:`defer_for_bulk_load`); their names are added to ``deferred``."""
    frags = catalog.load_fragments(nodes.coordinator) if fragments is None else fragments
    out = []
    loading: dict[str, bool] = {}
    for frag in frags:
        conn = nodes.get(frag.node)
        if _state(conn, frag.shard_name) is None:
            continue  # not built yet: reconcile builds it
        if not full:
            age = _oldest_change_age_s(conn, frag.shard_name)
            if age is None:
                continue  # nothing changed: no transaction, no temporary tables
            if defer_while_loading_s is not None:
                if frag.node not in loading:
                    loading[frag.node] = bulk_load_running(conn)
                if defer_for_bulk_load(loading[frag.node], age, defer_while_loading_s):
                    if deferred is not None:
                        deferred.append(frag.shard_name)
                    continue
        out.append(refresh_fragment(conn, frag, full))
    return out


# ---------------------------------------------------------------- reconcile


@dataclass(frozen=True)
class Placement:
    """Where a fragment's rollups are attached on the coordinator (buildsmart.rollup_partitions)."""

    shard: str
    node: str
    range_from: str | None
    range_to: str | None
    ts_from: datetime | None
    ts_to: datetime | None
    time_group: str | None

    @staticmethod
    def of(frag: Fragment) -> Placement:
        return Placement(frag.shard_name, frag.node, frag.range_from, frag.range_to, frag.ts_from, frag.ts_to, frag.time_group)


@dataclass(frozen=True)
class ReconcileResult:
    built: tuple[str, ...] = ()
    switched: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()  # fragments whose triggers could not be added yet (a writer held a lock)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def acted(self) -> bool:
        return bool(self.built or self.switched or self.dropped)


def plan_switch(current: Sequence[Placement], desired: Sequence[Placement]) -> tuple[list[Placement], list[Placement]]:
    """The coordinator partitions to drop and to attach so ``current`` becomes ``desired`` (pure)."""
    want = {p.shard: p for p in desired}
    have = {p.shard: p for p in current}
    drop = [p for s, p in have.items() if want.get(s) != p]
    attach = [p for s, p in want.items() if have.get(s) != p]
    return drop, attach


def _current_placements(coord: psycopg.Connection) -> list[Placement]:
    rows = coord.execute(
        "SELECT shard, node_name, range_from, range_to, ts_from, ts_to, time_group FROM buildsmart.rollup_partitions"
    ).fetchall()
    return [Placement(*r) for r in rows]


def _oldest_change_age_s(conn: psycopg.Connection, shard: str) -> float | None:
    """Seconds since the oldest change waiting in the fragment's rollup change log (None: none)."""
    row = conn.execute(
        "SELECT EXTRACT(epoch FROM pg_catalog.clock_timestamp() - min(noted_at)) FROM buildsmart.rollup_changes WHERE shard = %s",
        (shard,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def _ensure_built(
    nodes: NodeConnections,
    frag: Fragment,
    columns: dict[Kind, list[tuple[str, str, bool]]],
    defer_while_loading_s: float | None = None,
) -> str | None:
    """Triggers and tables of a fragment, and a full build when its rollups were made from another
    table (or never). Returns "built", "waiting" or None (already current). With
    ``defer_while_loading_s`` the full build, which reads every raw row of the fragment, waits for
    a bulk load on its worker like a refresh does (the load notes its changes; a fragment the
    load's layout just made would otherwise be built from most of the load, during it)."""
    conn = nodes.get(frag.node)
    if _missing_triggers(conn, frag.shard_name):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal("2s")))
                _lock_fragment_rollups(conn, frag.shard_name)
                missing = _missing_triggers(conn, frag.shard_name)  # again, under the lock
                for name in missing:
                    conn.execute(change_trigger_ddl(frag.shard_name, name))
        except psycopg.errors.LockNotAvailable:
            return "waiting"
        if missing:
            log.info("added the rollup change triggers of %s on %s", frag.shard_name, frag.node)
    with conn.transaction():
        _lock_fragment_rollups(conn, frag.shard_name)
        oid = _fragment_oid(conn, frag.shard_name)
        state = _state(conn, frag.shard_name)
        if state is not None and state.fragment_oid == oid and (state.ts_from, state.ts_to) == (frag.ts_from, frag.ts_to):
            return None
        if defer_while_loading_s is not None:
            age = _oldest_change_age_s(conn, frag.shard_name)  # None: the load does not write here
            if age is not None and defer_for_bulk_load(bulk_load_running(conn), age, defer_while_loading_s):
                return "waiting"
        for stmt in worker_tables_ddl(frag.shard_name, columns):
            conn.execute(stmt)
        for kind in KINDS:
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(
                    sql.Identifier(SHARD_SCHEMA, rollup_table(frag.shard_name, kind)), sql.Identifier(nodes.creds.fdw_user)
                )
            )
        conn.execute(
            "INSERT INTO buildsmart.rollup_state (shard, fragment_oid, range_from, range_to, ts_from, ts_to) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (shard) DO UPDATE SET fragment_oid = EXCLUDED.fragment_oid, "
            "range_from = EXCLUDED.range_from, range_to = EXCLUDED.range_to, ts_from = EXCLUDED.ts_from, "
            "ts_to = EXCLUDED.ts_to, built_at = now()",
            (frag.shard_name, oid, frag.range_from, frag.range_to, frag.ts_from, frag.ts_to),
        )
    refresh_fragment(conn, frag, full=True)
    log.info("built the rollups of %s %s on %s", frag.shard_name, frag.describe_range(), frag.node)
    return "built"


def _lock_fragment_rollups(conn: psycopg.Connection, shard: str) -> None:
    """The task runner and a command (`demo`, `rollups refresh`) may reconcile the same fragment at
    once; CREATE ... IF NOT EXISTS is not safe against that (a duplicate key in pg_type), so one
    builds under this lock and the other then finds the work done."""
    conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))", (f"buildsmart.rollups:{shard}",))


def reconcile(nodes: NodeConnections, defer_while_loading_s: float | None = None) -> ReconcileResult:
    """Build what is missing and attach the coordinator partitions of ready fragments; with
    ``defer_while_loading_s`` (the task) full builds wait for a bulk load (see _ensure_built)."""
    coord = nodes.coordinator
    frags = catalog.load_fragments(coord)
    columns: dict[Kind, list[tuple[str, str, bool]]] = {k: coordinator_columns(coord, f"public.readings_{k}") for k in KINDS}
    built, waiting = [], []
    for frag in frags:
        outcome = _ensure_built(nodes, frag, columns, defer_while_loading_s)
        if outcome == "built":
            built.append(frag.shard_name)
        elif outcome == "waiting":
            waiting.append(frag.shard_name)
    ready = [f for f in frags if f.shard_name not in waiting]
    drop, attach = plan_switch(_current_placements(coord), [Placement.of(f) for f in ready])
    if waiting:  # switch only once every fragment of a changed layout is ready
        attach = [p for p in attach if p.shard not in waiting]
    switched: list[str] = []
    if drop or attach:
        _switch(nodes, frags, drop, attach)
        switched = sorted({p.shard for p in attach} | {p.shard for p in drop})
    dropped = _drop_orphans(nodes, frags)
    return ReconcileResult(tuple(built), tuple(switched), tuple(dropped), tuple(waiting))


def _switch(nodes: NodeConnections, frags: Sequence[Fragment], drop: list[Placement], attach: list[Placement]) -> None:
    coord = nodes.coordinator
    app = sql.Identifier(nodes.creds.app_user)
    by_shard = {f.shard_name: f for f in frags}
    with coord.transaction():
        coord.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        coord.execute("LOCK TABLE public.readings_hourly, public.readings_daily IN ACCESS EXCLUSIVE MODE")
        for p in attach:  # a narrowed fragment (split): its rows of the other half go, inside the lock
            frag = by_shard[p.shard]
            _trim(nodes.get(frag.node), frag)
        for p in drop:
            for kind in KINDS:
                name = rollup_table(p.shard, kind)
                exists = coord.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (f"{SHARD_SCHEMA}.{name}",)).fetchone()
                if exists and exists[0]:
                    coord.execute(sql.SQL("DROP FOREIGN TABLE {}").format(sql.Identifier(SHARD_SCHEMA, name)))
            coord.execute("DELETE FROM buildsmart.rollup_partitions WHERE shard = %s", (p.shard,))
        _drop_unused_groups(coord, {p.time_group for p in attach if p.time_group} | _groups_in_use(coord))
        for p in attach:
            server = coord.execute("SELECT server_name FROM buildsmart.nodes WHERE name = %s", (p.node,)).fetchone()
            if server is None or server[0] is None:
                raise psycopg.errors.UndefinedObject(f"node {p.node} has no foreign server")
            for kind in KINDS:
                parent = coordinator_table(kind)
                if p.time_group is not None:
                    parent = _ensure_group(coord, p, kind, app)
                coord.execute(_attach_sql(p, kind, parent, str(server[0])))
                foreign = sql.Identifier(SHARD_SCHEMA, rollup_table(p.shard, kind))
                coord.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(foreign, app))
            coord.execute(
                "INSERT INTO buildsmart.rollup_partitions (shard, node_name, range_from, range_to, ts_from, ts_to, time_group) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (p.shard, p.node, p.range_from, p.range_to, p.ts_from, p.ts_to, p.time_group),
            )
        _drop_unused_groups(coord, _groups_in_use(coord))
    log.info(
        "switched the rollup partitions on the coordinator: %d detached, %d attached (%s)",
        len(drop), len(attach), ", ".join(f"{p.shard} on {p.node}" for p in attach) or "none",
    )  # fmt: skip


def _bound(value: str | None, infinite: str) -> sql.Composable:
    return sql.SQL(infinite) if value is None else sql.SQL("({})").format(sql.Literal(value))


def _ts_bound(value: datetime | None, infinite: str) -> sql.Composable:
    return sql.SQL(infinite) if value is None else sql.SQL("({})").format(sql.Literal(value.isoformat()))


def _attach_sql(p: Placement, kind: Kind, parent: sql.Identifier, server: str) -> sql.Composed:
    if p.time_group is None:
        bounds = sql.SQL("FOR VALUES FROM {} TO {}").format(_bound(p.range_from, "(MINVALUE)"), _bound(p.range_to, "(MAXVALUE)"))
    else:
        bounds = sql.SQL("FOR VALUES FROM {} TO {}").format(_ts_bound(p.ts_from, "(MINVALUE)"), _ts_bound(p.ts_to, "(MAXVALUE)"))
    name = rollup_table(p.shard, kind)
    return sql.SQL("CREATE FOREIGN TABLE {} PARTITION OF {} {} SERVER {} OPTIONS (schema_name {}, table_name {})").format(
        sql.Identifier(SHARD_SCHEMA, name), parent, bounds, sql.Identifier(server), sql.Literal(SHARD_SCHEMA), sql.Literal(name)
    )


def _ensure_group(coord: psycopg.Connection, p: Placement, kind: Kind, app: sql.Identifier) -> sql.Identifier:
    assert p.time_group is not None
    group = sql.Identifier(SHARD_SCHEMA, rollup_table(p.time_group, kind))
    name = f"{SHARD_SCHEMA}.{rollup_table(p.time_group, kind)}"
    exists = coord.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    if not (exists and exists[0]):
        coord.execute(sql.SQL("CREATE TABLE {} (LIKE {}) PARTITION BY RANGE (ts)").format(group, coordinator_table(kind)))
        coord.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM {} TO {}").format(
                coordinator_table(kind), group, _bound(p.range_from, "(MINVALUE)"), _bound(p.range_to, "(MAXVALUE)")
            )
        )
        coord.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(group, app))
    return group


def _groups_in_use(coord: psycopg.Connection) -> set[str]:
    rows = coord.execute("SELECT DISTINCT time_group FROM buildsmart.rollup_partitions WHERE time_group IS NOT NULL").fetchall()
    return {str(r[0]) for r in rows}


def _drop_unused_groups(coord: psycopg.Connection, keep: set[str]) -> None:
    for kind in KINDS:
        rows = coord.execute(
            "SELECT c.relname FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass AND c.relkind = 'p'",
            (f"public.readings_{kind}",),
        ).fetchall()
        for (name,) in rows:
            if str(name).removesuffix(f"_{kind}") not in keep:
                coord.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(SHARD_SCHEMA, str(name))))


def _trim(conn: psycopg.Connection, frag: Fragment) -> None:
    """Delete rollup rows outside the fragment's building range (a split narrowed it)."""
    state = _state(conn, frag.shard_name)
    if state is None or (state.range_from, state.range_to) == (frag.range_from, frag.range_to):
        return
    outside: list[sql.Composable] = []
    if frag.range_from is not None:
        outside.append(sql.SQL("building < {}").format(sql.Literal(frag.range_from)))
    if frag.range_to is not None:
        outside.append(sql.SQL("building >= {}").format(sql.Literal(frag.range_to)))
    with conn.transaction():
        for kind in KINDS:
            if outside:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {}").format(
                        sql.Identifier(SHARD_SCHEMA, rollup_table(frag.shard_name, kind)), sql.SQL(" OR ").join(outside)
                    )
                )
        conn.execute(
            "UPDATE buildsmart.rollup_state SET range_from = %s, range_to = %s WHERE shard = %s",
            (frag.range_from, frag.range_to, frag.shard_name),
        )
    log.info("trimmed the rollups of %s on %s to %s", frag.shard_name, frag.node, frag.describe_range())


def _drop_orphans(nodes: NodeConnections, frags: Sequence[Fragment]) -> list[str]:
    """Rollup tables, states and pending changes of fragments that are no longer on that node."""
    placed = {(f.node, f.shard_name) for f in frags}
    dropped = []
    for worker in nodes.topology.workers:
        conn = nodes.get(worker.name)
        rows = conn.execute("SELECT shard FROM buildsmart.rollup_state").fetchall()
        for (shard,) in rows:
            if (worker.name, shard) in placed:
                continue
            with conn.transaction():
                for kind in KINDS:
                    table = sql.Identifier(SHARD_SCHEMA, rollup_table(shard, kind))
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
                conn.execute("DELETE FROM buildsmart.rollup_state WHERE shard = %s", (shard,))
            dropped.append(f"{shard}@{worker.name}")
            log.info("dropped the rollups of %s on %s (the fragment is no longer there)", shard, worker.name)
        here = [s for n, s in placed if n == worker.name]
        conn.execute("DELETE FROM buildsmart.rollup_changes WHERE NOT (shard = ANY(%s))", (here,))
    return dropped


# ---------------------------------------------------------------- status and retention


@dataclass(frozen=True)
class FragmentRollups:
    shard: str
    node: str
    built_at: datetime | None
    refreshed_at: datetime | None
    pending: int  # change-log rows waiting
    oldest_pending: datetime | None
    hourly_rows: int
    daily_rows: int


@dataclass(frozen=True)
class RollupSettings:
    refresh_every_s: float
    keep_raw: str | None
    keep_hourly: str | None
    keep_daily: str | None
    paused: bool


def settings(coord: psycopg.Connection) -> RollupSettings:
    row = coord.execute(
        "SELECT extract(epoch FROM refresh_every)::float8, keep_raw::text, keep_hourly::text, keep_daily::text, paused "
        "FROM buildsmart.rollup_settings"
    ).fetchone()
    if row is None:
        return RollupSettings(5.0, None, None, None, False)
    return RollupSettings(float(row[0]), row[1], row[2], row[3], bool(row[4]))


def set_settings(coord: psycopg.Connection, **changes: object) -> RollupSettings:
    """Update rollup settings (refresh_every, keep_raw, keep_hourly, keep_daily: interval text or
    None; paused: bool)."""
    allowed = {"refresh_every", "keep_raw", "keep_hourly", "keep_daily", "paused"}
    assignments = []
    values = []
    for key, value in changes.items():
        if key not in allowed:
            raise ValueError(key)
        cast = "::boolean" if key == "paused" else "::interval"
        assignments.append(sql.SQL("{} = %s{}").format(sql.Identifier(key), sql.SQL(cast)))
        values.append(value)
    if assignments:
        update = sql.SQL("UPDATE buildsmart.rollup_settings SET {}, changed_at = now()")
        coord.execute(update.format(sql.SQL(", ").join(assignments)), values)
        log.info("rollup settings changed: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
    return settings(coord)


def status(nodes: NodeConnections) -> list[FragmentRollups]:
    out = []
    for frag in catalog.load_fragments(nodes.coordinator):
        conn = nodes.get(frag.node)
        state = _state(conn, frag.shard_name)
        pend = conn.execute(
            "SELECT count(*), min(noted_at) FROM buildsmart.rollup_changes WHERE shard = %s", (frag.shard_name,)
        ).fetchone()
        counts = []
        for kind in KINDS:
            row = conn.execute(
                "SELECT CASE WHEN c.reltuples < 0 THEN 0 ELSE c.reltuples END::bigint FROM pg_catalog.pg_class c "
                "WHERE c.oid = pg_catalog.to_regclass(%s)",
                (f"{SHARD_SCHEMA}.{rollup_table(frag.shard_name, kind)}",),
            ).fetchone()
            counts.append(int(row[0]) if row else 0)
        assert pend is not None
        out.append(
            FragmentRollups(
                frag.shard_name, frag.node, state.built_at if state else None, state.refreshed_at if state else None,
                int(pend[0]), pend[1], counts[0], counts[1],
            )
        )  # fmt: skip
    return out


def apply_retention(nodes: NodeConnections, keep_hourly: str | None, keep_daily: str | None) -> int:
    """Delete rollup rows older than their retention (raw rows have their own, keep_raw)."""
    deleted = 0
    for frag in catalog.load_fragments(nodes.coordinator):
        conn = nodes.get(frag.node)
        if _state(conn, frag.shard_name) is None:
            continue
        for kind, keep in (("hourly", keep_hourly), ("daily", keep_daily)):
            if keep is None:
                continue
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE ts < now() - %s::interval").format(
                    sql.Identifier(SHARD_SCHEMA, rollup_table(frag.shard_name, kind))  # type: ignore[arg-type]
                ),
                (keep,),
            )
            if cur.rowcount:
                log.info("deleted %d %s rollup row(s) of %s older than %s", cur.rowcount, kind, frag.shard_name, keep)
            deleted += cur.rowcount
    return deleted

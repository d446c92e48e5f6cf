"""Reference tables on every worker: copies of the coordinator's public.buildings, public.meters
and public.meter_replacements, under the same names and with the same columns.

Why copies: the rollups run on the workers, next to the rows, and need each building's time
zone and each meter's reading type, multiplier, register maximum and expected interval. Same
names and columns as on the coordinator, so a join of readings with buildings can later be
shipped verbatim to a worker by the distributed planner (Citus' reference tables).

How they stay consistent: the coordinator is the only place they are edited; a statement
trigger there bumps buildsmart.reference_version. :func:`sync` compares each worker's applied
version with the coordinator's; when they differ it reads the coordinator's rows in one snapshot
and, in ONE worker transaction, replaces the rows that differ, invalidates the rollups of every
meter whose metadata changed (its whole history: a new time zone moves every day), and records
the version. So a worker's rollups are never computed from metadata they are not invalidated
for. The rollups task runs it before every refresh; imports run it right after they commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.executor import coordinator_columns
from orchestrator.fragments import Fragment, Router
from orchestrator.nodeconn import NodeConnections

log = logging.getLogger(__name__)

# table -> (key columns, what a change invalidates: "building" or "meter")
REFERENCE_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "buildings": (("code",), "building"),
    "meters": (("building", "meter"), "meter"),
    "meter_replacements": (("building", "meter", "ts"), "meter"),
}


@dataclass(frozen=True)
class SyncResult:
    version: int
    workers: tuple[str, ...]  # workers brought up to date
    changed_rows: int
    invalidated: int  # change-log rows written for the rollups


def coordinator_version(coord: psycopg.Connection) -> int:
    row = coord.execute("SELECT version FROM buildsmart.reference_version").fetchone()
    return int(row[0]) if row else 0


def _worker_version(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT version FROM buildsmart.reference_version").fetchone()
    return int(row[0]) if row else 0


def _ensure_table(conn: psycopg.Connection, table: str, columns: list[tuple[str, str, bool]], reader: str) -> None:
    """The worker copy with the coordinator's columns; re-made when they differ (a migration).
    ``reader``: the fdw role, which the coordinator's queries log in to workers as."""
    keys = REFERENCE_TABLES[table][0]
    current = coordinator_columns(conn, f"public.{table}") if _exists(conn, table) else None
    if current == columns:
        return
    ident = sql.Identifier("public", table)
    cols = [sql.SQL("{} {}{}").format(sql.Identifier(n), sql.SQL(t), sql.SQL(" NOT NULL" if nn else "")) for n, t, nn in columns]
    cols.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, keys))))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(", ").join(cols)))
    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(ident, sql.Identifier(reader)))
    conn.execute("UPDATE buildsmart.reference_version SET version = 0")  # filled below, in this transaction
    log.info("made the reference copy public.%s on this worker (%d columns)", table, len(columns))


def _exists(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (f"public.{table}",)).fetchone()
    return bool(row and row[0])


def _rows(conn: psycopg.Connection, table: str, columns: Sequence[str]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    keys = REFERENCE_TABLES[table][0]
    query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier("public", table))
    idx = [list(columns).index(k) for k in keys]
    return {tuple(r[i] for i in idx): tuple(r) for r in conn.execute(query).fetchall()}


def sync(nodes: NodeConnections, fragments: Sequence[Fragment], force: bool = False) -> SyncResult:
    """Bring every worker's copies to the coordinator's content (see the module docstring)."""
    coord = nodes.coordinator
    if not force:  # the common case, every few seconds: nothing changed, read no rows
        version = coordinator_version(coord)
        if all(
            _worker_version(c) == version and all(_exists(c, t) for t in REFERENCE_TABLES)
            for c in (nodes.get(w.name) for w in nodes.topology.workers)
        ):
            return SyncResult(version, (), 0, 0)
    with coord.transaction():
        coord.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = coordinator_version(coord)
        shape = {t: coordinator_columns(coord, f"public.{t}") for t in REFERENCE_TABLES}
        wanted = {t: _rows(coord, t, [c[0] for c in shape[t]]) for t in REFERENCE_TABLES}
    router = Router(fragments) if fragments else None
    done: list[str] = []
    changed_total = invalidated_total = 0
    for worker in nodes.topology.workers:
        conn = nodes.get(worker.name)
        if not force and _worker_version(conn) == version and all(_exists(conn, t) for t in REFERENCE_TABLES):
            continue
        with conn.transaction():
            # one sync per worker at a time (the task runner and an import's CLI), then look again
            conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(1112755530, 0)")
            if not force and _worker_version(conn) == version and all(_exists(conn, t) for t in REFERENCE_TABLES):
                continue
            touched_buildings: set[str] = set()
            touched_meters: set[tuple[str, str]] = set()
            changed = 0
            for table, (keys, scope) in REFERENCE_TABLES.items():
                cols = [c[0] for c in shape[table]]
                _ensure_table(conn, table, shape[table], nodes.creds.fdw_user)
                have = _rows(conn, table, cols)
                want = wanted[table]
                gone = [k for k in have if k not in want]
                new = [want[k] for k in want if have.get(k) != want[k]]
                for key in gone + [tuple(r[cols.index(k)] for k in keys) for r in new]:
                    if scope == "building":
                        touched_buildings.add(str(key[0]))
                    else:
                        touched_meters.add((str(key[0]), str(key[1])))
                where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in keys)
                for key in gone + [tuple(r[cols.index(k)] for k in keys) for r in new]:
                    conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier("public", table), where), key)
                if new:
                    with conn.cursor() as cur:
                        cur.executemany(
                            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                                sql.Identifier("public", table),
                                sql.SQL(", ").join(map(sql.Identifier, cols)),
                                sql.SQL(", ").join(sql.Placeholder() * len(cols)),
                            ),
                            [_adapt(r) for r in new],
                        )
                changed += len(gone) + len(new)
            invalidated = _invalidate(conn, worker.name, router, touched_buildings, touched_meters)
            conn.execute("UPDATE buildsmart.reference_version SET version = %s, synced_at = now()", (version,))
        done.append(worker.name)
        changed_total += changed
        invalidated_total += invalidated
        log.info(
            "reference tables on %s now at version %d: %d row(s) changed, rollups of %d building(s) and %d meter(s) invalidated",
            worker.name, version, changed, len(touched_buildings), len(touched_meters),
        )  # fmt: skip
    return SyncResult(version, tuple(done), changed_total, invalidated_total)


def _adapt(row: tuple[Any, ...]) -> tuple[Any, ...]:
    from psycopg.types.json import Jsonb

    return tuple(Jsonb(v) if isinstance(v, dict | list) else v for v in row)


def _invalidate(
    conn: psycopg.Connection, node: str, router: Router | None, buildings: set[str], meters: set[tuple[str, str]]
) -> int:
    """Change-log rows (all time) for the fragments on ``node`` holding the touched buildings and
    meters; a building's change covers all its meters (those present in the fragment)."""
    if router is None or not (buildings or meters):
        return 0
    written = 0
    for b in sorted(buildings | {m[0] for m in meters}):
        entry = router.entry(b)
        pieces = entry.fragments if not isinstance(entry, Fragment) else (entry,)
        for frag in pieces:
            if frag.node != node:
                continue
            only = None if b in buildings else [m for bb, m in meters if bb == b]
            cur = conn.execute(
                sql.SQL(
                    "INSERT INTO buildsmart.rollup_changes (shard, building, meter, ts_from, ts_to) "
                    "SELECT %s, m.building, m.meter, '-infinity', 'infinity' FROM ("
                    "  SELECT DISTINCT f.building, f.meter FROM {} f WHERE f.building = %s"
                    "  AND (%s::text[] IS NULL OR f.meter = ANY(%s::text[]))) m"
                ).format(sql.Identifier("bsdata", frag.shard_name)),
                (frag.shard_name, b, only, only),
            )
            written += cur.rowcount
    return written

"""Verification of a copied fragment in time-partition units, so the write pause does not grow
with the fragment.

Before the pause (writes go on) every time partition is checksummed on both sides, after a
:class:`~orchestrator.elastic.watch.ChangeWatch` was started and the copy had caught up to its
start. A partition that matched then and that the watch saw no change to since is still equal
when the pause begins: its source did not change after the watch started, and its copy had
everything up to that point. Inside the pause only the other partitions are checksummed again.
Whenever the two layouts differ (a time partition was created or dropped meanwhile) or a
TRUNCATE was seen, :func:`recheck_units` answers None and the caller verifies everything, as
before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator.elastic import shardops
from orchestrator.fragments import SHARD_SCHEMA

log = logging.getLogger(__name__)

Sums = tuple[int, int]  # row count, sum of whole-row hashes

# The one checksum of the project (moves, splits, `buildsmart check`, restore points and restore
# verification): row count and an order-independent sum of 64-bit hashes of every whole row.
ROW_SUMS = sql.SQL("count(*), coalesce(sum(pg_catalog.hashtextextended(r::text, 0)::numeric), 0)::text")


def _pin_row_text(conn: psycopg.Connection) -> None:
    """The same text form of every row on both sides (r::text depends on these settings).
    Inside the caller's transaction (SET LOCAL)."""
    conn.execute("SET LOCAL timezone = 'UTC'")
    conn.execute("SET LOCAL extra_float_digits = 3")


def table_sums(conn: psycopg.Connection, table: sql.Composable, where: sql.Composable | None = None) -> Sums:
    """Sums of a whole table (or the rows matching ``where``) in one statement."""
    filt = sql.SQL(" WHERE ") + where if where is not None else sql.SQL("")
    with conn.transaction():
        _pin_row_text(conn)
        row = conn.execute(sql.SQL("SELECT {} FROM {} r{}").format(ROW_SUMS, table, filt)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def fragment_sums(conn: psycopg.Connection, shard: str, where: sql.Composable | None = None) -> Sums:
    """Sums of a whole fragment table on its worker."""
    return table_sums(conn, shardops.table(shard), where)


def parallel_fragment_sums(jobs: list[tuple[psycopg.Connection, str, sql.Composable | None]]) -> list[Sums]:
    """Several fragments' sums at once (one connection each), e.g. source and target of a move."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda j: fragment_sums(*j), jobs))


Layout = dict[str, int]  # partition bound ("DEFAULT" or "FOR VALUES FROM ... TO ...") -> leaf OID


@dataclass(frozen=True)
class PreCheck:
    """Per-unit sums of both sides before the pause, keyed by partition bound."""

    source: dict[str, Sums]
    target: dict[str, Sums]

    @property
    def verified(self) -> frozenset[str]:
        return frozenset(b for b, s in self.source.items() if self.target.get(b) == s)


def recheck_units(pre: PreCheck, source_now: Layout, target_now: Layout, changed: set[int], truncated: bool) -> set[str] | None:
    """The units to checksum again inside the pause, or None when only a full check is safe.

    ``changed`` holds OIDs of source partitions written since the watch started."""
    if (
        truncated
        or set(source_now) != set(pre.source)
        or set(target_now) != set(pre.target)
        or set(source_now) != set(target_now)
    ):
        return None
    dirty = {b for b, oid in source_now.items() if oid in changed}
    return {b for b in source_now if b in dirty or b not in pre.verified}


def combine(sums: Mapping[str, Sums]) -> Sums:
    return sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values())


def layout(conn: psycopg.Connection, shard: str) -> Layout:
    return {b: oid for b, (oid, _) in _leaves(conn, shard).items()}


def _leaves(conn: psycopg.Connection, shard: str) -> dict[str, tuple[int, str]]:
    with conn.transaction():
        conn.execute("SET LOCAL timezone = 'UTC'")  # bounds print in the session's time zone
        rows = conn.execute(
            "SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid), c.oid::bigint, c.relname "
            "FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid "
            "WHERE t.isleaf AND t.level = 1",
            (shardops.regclass(shard),),
        ).fetchall()
    return {str(b): (int(oid), str(name)) for b, oid, name in rows}


def unit_sums(
    conn: psycopg.Connection, shard: str, units: set[str] | None = None, where: sql.Composable | None = None
) -> dict[str, Sums]:
    """Count and whole-row checksum per time partition (all, or those bounds) in one statement,
    so in one snapshot. Runs inside the caller's transaction when there is one."""
    leaves = {b: name for b, (_, name) in _leaves(conn, shard).items() if units is None or b in units}
    if not leaves:
        return {}
    filt = sql.SQL(" WHERE ") + where if where is not None else sql.SQL("")
    parts = [
        sql.SQL("SELECT {}::text, {} FROM {} r{}").format(sql.Literal(b), ROW_SUMS, sql.Identifier(SHARD_SCHEMA, name), filt)
        for b, name in leaves.items()
    ]
    with conn.transaction():
        _pin_row_text(conn)
        rows = conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall()
    return {str(b): (int(n), int(s)) for b, n, s in rows}

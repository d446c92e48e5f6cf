"""Cheap observation of fragments on their workers, for the balancer, rebalance and status.

Nothing here reads the rows. Per worker, ONE query over the catalogs returns, per fragment, its
bytes (``pg_total_relation_size`` of every time partition and index), its estimated live rows and
its cumulative writes (``pg_stat_user_tables``: maintained by the server at every commit), and its
number of time partitions. Write counters are cumulative and restart at zero after a server
restart or failover; rates are differences between two samples (orchestrator.elastic.autobalance).

Split points come from statistics: ``ANALYZE ONLY`` of a fragment's root samples a fixed number of
rows whatever its size (orchestrator.elastic.splitpoints turns pg_stats into a split point).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog
from orchestrator.elastic import shardops
from orchestrator.elastic.context import Elastic
from orchestrator.elastic.splitpoints import ColumnStats, building_split_point, time_split_point
from orchestrator.fragments import SHARD_SCHEMA, Fragment

log = logging.getLogger(__name__)

# ANALYZE samples 300 x this many rows and keeps this many most common values and histogram
# buckets: 100 (PostgreSQL's default) puts a cut within about 1% of the rows of the ideal one.
STATISTICS_TARGET = 100

# Live rows: the statistics system's count, or, where it has none (a primary promoted after a
# failover starts with empty counters), the estimate VACUUM/ANALYZE left in pg_class.
_SAMPLE_SQL = """
SELECT f.shard,
       coalesce(sum(pg_catalog.pg_total_relation_size(t.relid)), 0)::bigint,
       coalesce(sum(CASE WHEN t.isleaf THEN coalesce(nullif(s.n_live_tup, 0), greatest(c.reltuples, 0)) END), 0)::bigint,
       coalesce(sum(s.n_tup_ins + s.n_tup_upd + s.n_tup_del), 0)::bigint,
       count(*) FILTER (WHERE t.isleaf)
  FROM unnest(%s::text[]) AS f(shard)
  CROSS JOIN LATERAL pg_catalog.pg_partition_tree(pg_catalog.to_regclass(%s || '.' || pg_catalog.quote_ident(f.shard))) t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = t.relid
 GROUP BY f.shard
"""


@dataclass(frozen=True)
class FragmentSample:
    fragment: Fragment
    bytes: int
    rows: int  # live rows as the statistics system counts them (exact after quiet periods)
    writes: int  # cumulative rows inserted, updated or deleted since the server's stats began
    partitions: int


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    version: int  # catalog version the placements were read at
    fragments: tuple[FragmentSample, ...]
    unreachable: frozenset[str] = frozenset()  # workers that did not answer

    def by_id(self) -> dict[int, FragmentSample]:
        return {s.fragment.fragment_id: s for s in self.fragments}


def sample_node(conn: psycopg.Connection, fragments: Iterable[Fragment]) -> dict[str, tuple[int, int, int, int]]:
    """shard -> (bytes, live rows, cumulative writes, time partitions) for fragments on this node."""
    shards = [f.shard_name for f in fragments]
    if not shards:
        return {}
    rows = conn.execute(_SAMPLE_SQL, (shards, SHARD_SCHEMA)).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}


def sample(el: Elastic) -> Sample:
    """One look at every fragment (one catalog query per worker)."""
    version = catalog.catalog_version(el.coord)
    frags = el.fragments()
    by_node: dict[str, list[Fragment]] = {}
    for f in frags:
        by_node.setdefault(f.node, []).append(f)
    measured: dict[str, tuple[int, int, int, int]] = {}
    unreachable = set()
    for node, members in by_node.items():
        try:
            measured.update(sample_node(el.nodes.get(node), members))
        except psycopg.OperationalError as exc:
            log.info("cannot sample fragments on %s: %s", node, str(exc).strip())
            unreachable.add(node)
    out = tuple(FragmentSample(f, *measured[f.shard_name]) for f in frags if f.shard_name in measured)
    return Sample(time.monotonic(), version, out, frozenset(unreachable))


def store(el: Elastic, s: Sample) -> None:
    """Keep the last sizes in buildsmart.fragment_stats (citus_shards shows them)."""
    catalog.store_fragment_stats(el.coord, {x.fragment.fragment_id: (x.bytes, x.rows) for x in s.fragments})


# ---------------------------------------------------------------- statistics and split points


_STATS_SQL = {
    cast: sql.SQL(
        "SELECT null_frac, n_distinct, most_common_vals::text::{cast}[], most_common_freqs, histogram_bounds::text::{cast}[] "
        "FROM pg_catalog.pg_stats WHERE schemaname = %s AND tablename = %s AND attname = %s AND inherited"
    ).format(cast=sql.SQL(cast))
    for cast in ("text", "timestamptz")
}


def _column_stats(conn: psycopg.Connection, shard: str, column: str, cast: str) -> ColumnStats[Any] | None:
    row = conn.execute(_STATS_SQL[cast], (SHARD_SCHEMA, shard, column)).fetchone()
    if row is None:
        return None
    mcv = tuple(zip(row[2] or [], row[3] or [], strict=True))
    return ColumnStats(float(row[0]), float(row[1]), mcv, tuple(row[4] or []))


def analyze(conn: psycopg.Connection, shard: str) -> None:
    """Fresh statistics of a fragment's whole tree, sampled (PostgreSQL 18: ONLY skips re-analyzing
    each time partition; autovacuum never analyzes a partitioned root)."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL default_statistics_target = {}").format(sql.Literal(STATISTICS_TARGET)))
        conn.execute(sql.SQL("ANALYZE ONLY {} (building, ts)").format(shardops.table(shard)))


def partition_starts(conn: psycopg.Connection, shard: str) -> list[datetime]:
    rows = conn.execute(
        "SELECT substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \\(''([^'']+)''\\)')::timestamptz "
        "FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid "
        "WHERE t.isleaf AND t.level = 1 AND c.relpartbound IS NOT NULL",
        (shardops.regclass(shard),),
    ).fetchall()
    return sorted(r[0] for r in rows if r[0] is not None)


@dataclass(frozen=True)
class SplitPoints:
    at: str | None  # building split point (None: a single building, or in a time group)
    at_ts: datetime | None  # time split point, when no building split point exists


def split_points(el: Elastic, frag: Fragment, fresh: bool = True) -> SplitPoints:
    """Split points of one fragment from its statistics (ANALYZEd first unless ``fresh`` is False)."""
    conn = el.nodes.get(frag.node)
    if fresh:
        analyze(conn, frag.shard_name)
    at = None
    if frag.time_group is None:
        buildings = _column_stats(conn, frag.shard_name, "building", "text")
        if buildings is not None:
            at = building_split_point(buildings, frag.range_from, frag.range_to)
    if at is not None:
        return SplitPoints(at, None)
    times = _column_stats(conn, frag.shard_name, "ts", "timestamptz")
    at_ts = None
    if times is not None:
        at_ts = time_split_point(times, partition_starts(conn, frag.shard_name), frag.ts_from, frag.ts_to)
    log.info("split points of fragment %d from statistics: building %r, time %s", frag.fragment_id, at, at_ts)
    return SplitPoints(at, at_ts)


def split_points_of(el: Elastic, fragments: Iterable[Fragment]) -> Mapping[int, SplitPoints]:
    return {f.fragment_id: split_points(el, f) for f in fragments}

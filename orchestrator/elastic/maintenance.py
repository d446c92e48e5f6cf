"""Time partitions on every fragment: keep future ones in place, and retention of old ones.

Retention is planned first (a pure list of partitions, printed by --dry-run) and applied second:
a partition goes only when its whole range ends before the cut-off, so no row younger than
``--older-than`` is ever touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg import sql

from orchestrator.elastic import shardops
from orchestrator.elastic.context import Elastic
from orchestrator.fragments import SHARD_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_AHEAD = 3

_PARTITIONS_SQL = """
SELECT c.relname,
       substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM 'TO \\(''([^'']+)''\\)')::timestamptz AS upper_bound
  FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid
 WHERE t.level = 1 AND t.isleaf
 ORDER BY 2
"""


@dataclass(frozen=True)
class ExpiredPartition:
    node: str
    fragment: str
    partition: str
    upper_bound: datetime

    def describe(self) -> str:
        return f"{self.node}: {SHARD_SCHEMA}.{self.partition} of {self.fragment} (rows before {self.upper_bound:%Y-%m-%d %H:%M})"


def ensure_future_partitions(el: Elastic, ahead: int = DEFAULT_AHEAD) -> dict[str, int]:
    """Create missing partitions from now to ``ahead`` intervals on; returns created per fragment."""
    created: dict[str, int] = {}
    now = datetime.now(UTC)
    for frag in el.fragments():
        if frag.ts_to is not None and frag.ts_to <= now:
            continue  # the earlier part of a building split by time: no future rows come here
        row = (
            el.nodes.get(frag.node)
            .execute(
                "SELECT buildsmart.ensure_time_partitions(%s::regclass, %s::interval, now(), now() + %s * %s::interval)",
                (shardops.regclass(frag.shard_name), frag.time_interval, ahead, frag.time_interval),
            )
            .fetchone()
        )
        created[frag.shard_name] = int(row[0]) if row else 0
        if created[frag.shard_name]:
            log.info("created %d future time partition(s) of %s on %s", created[frag.shard_name], frag.shard_name, frag.node)
    return created


def plan_retention(el: Elastic, older_than: str) -> list[ExpiredPartition]:
    cutoff_row = el.coord.execute("SELECT now() - %s::interval", (older_than,)).fetchone()
    assert cutoff_row is not None
    cutoff = cutoff_row[0]
    out = []
    for frag in el.fragments():
        rows = el.nodes.get(frag.node).execute(_PARTITIONS_SQL, (shardops.regclass(frag.shard_name),)).fetchall()
        out += [ExpiredPartition(frag.node, frag.shard_name, name, ub) for name, ub in rows if ub is not None and ub <= cutoff]
    return out


def apply_retention(el: Elastic, expired: list[ExpiredPartition], drop: bool = True) -> int:
    """Detach (and by default drop) each expired partition, one short transaction each."""
    for p in expired:
        conn = el.nodes.get(p.node)
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                    shardops.table(p.fragment), sql.Identifier(SHARD_SCHEMA, p.partition)
                )
            )
            if drop:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(SHARD_SCHEMA, p.partition)))
        log.info("%s %s", "dropped" if drop else "detached", p.describe())
    return len(expired)

"""Writes one fragment's batches on its worker: COPY into a staging table, then one set-based
upsert where the latest value of a (building, meter, ts) wins — inside the batch (the highest
line number wins) and against what is stored (a changed value replaces it; an equal one is
left alone, so loading the same file again writes nothing). New and replaced rows are told apart
with PostgreSQL 18's ``RETURNING old.*`` (xmax is not available through a partitioned table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from orchestrator.connections import Target, connect
from orchestrator.fragments import SHARD_SCHEMA, Fragment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchCounts:
    staged: int = 0  # rows sent
    inserted: int = 0  # new keys
    updated: int = 0  # stored value replaced by a different one
    distinct: int = 0  # distinct keys in the batch

    @property
    def superseded(self) -> int:
        """Rows replaced by a later row of the same key in the same batch."""
        return self.staged - self.distinct

    @property
    def unchanged(self) -> int:
        return self.distinct - self.inserted - self.updated

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(
            self.staged + other.staged,
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.distinct + other.distinct,
        )


class FragmentWriter:
    """Owns one connection to the fragment's worker group; used from a single thread."""

    def __init__(self, fragment: Fragment, target: Target) -> None:
        self.fragment = fragment
        self.target = target
        self.table = sql.Identifier(SHARD_SCHEMA, fragment.shard_name)
        self.stage = sql.Identifier(f"bs_stage_{fragment.shard_name}")
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.target, f"ingest:{self.fragment.shard_name}")
            with conn.transaction():
                # Our bulk upsert replaces values itself; the per-row replace trigger is for SQL clients.
                conn.execute("SET session_replication_role = replica")
                conn.execute(
                    sql.SQL(
                        'CREATE TEMP TABLE IF NOT EXISTS {} (building text COLLATE "C", meter text, ts timestamptz, '
                        "kwh double precision, seq bigint GENERATED ALWAYS AS IDENTITY) ON COMMIT DELETE ROWS"
                    ).format(self.stage)
                )
            self._conn = conn
        return self._conn

    def ensure_partitions(self, lo: datetime, hi: datetime) -> int:
        """Create missing time partitions for [lo, hi] in their own short transaction, so the
        brief DDL locks are not held for the length of the load."""
        conn = self._connection()
        with conn.transaction():
            row = conn.execute(
                "SELECT buildsmart.ensure_time_partitions(%s::regclass, %s::interval, %s, %s)",
                (f"{SHARD_SCHEMA}.{self.fragment.shard_name}", self.fragment.time_interval, lo, hi),
            ).fetchone()
        created = int(row[0]) if row else 0
        if created:
            log.info("created %d time partition(s) on %s for %s..%s", created, self.fragment.shard_name, lo, hi)
        return created

    def write(self, csv_lines: list[str]) -> BatchCounts:
        """Load one batch in one transaction; returns what it did."""
        conn = self._connection()
        with conn.transaction():
            with conn.cursor().copy(
                sql.SQL("COPY {} (building, meter, ts, kwh) FROM STDIN (FORMAT csv)").format(self.stage)
            ) as copy:
                copy.write("\n".join(csv_lines) + "\n")
            row = conn.execute(self._upsert_sql()).fetchone()
        assert row is not None
        return BatchCounts(len(csv_lines), int(row[0]), int(row[1]), int(row[2]))

    def _upsert_sql(self) -> sql.Composed:
        return sql.SQL(
            "WITH src AS ("
            "  SELECT DISTINCT ON (building, meter, ts) building, meter, ts, kwh FROM {stage}"
            "  ORDER BY building, meter, ts, seq DESC"
            "), ins AS ("
            "  INSERT INTO {table} AS r (building, meter, ts, kwh) SELECT building, meter, ts, kwh FROM src"
            "  ON CONFLICT (building, meter, ts) DO UPDATE SET kwh = EXCLUDED.kwh"
            "  WHERE r.kwh IS DISTINCT FROM EXCLUDED.kwh"
            "  RETURNING old.building IS NULL AS fresh"
            ") SELECT count(*) FILTER (WHERE fresh), count(*) FILTER (WHERE NOT fresh), (SELECT count(*) FROM src) FROM ins"
        ).format(stage=self.stage, table=self.table)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

"""Writes one fragment's batches on its worker: COPY into a staging table, then one set-based
upsert where the latest value of a (building, meter, ts) wins — inside the batch (the highest
line number wins) and against what is stored (a changed value replaces it; an equal one is
left alone, so loading the same file again writes nothing). New and replaced rows are told apart
with PostgreSQL 18's ``RETURNING old.*`` (xmax is not available through a partitioned table).

Exactly once in effect: applying a batch is idempotent (the same rows give the same table), and a
fragment's batches are applied in order, so a batch whose commit outcome is unknown (connection
lost, worker restarted, failover) is simply applied again on a new connection, which follows the
group's primary. Each batch holds the fragment's write lock on the coordinator (the switch
protocol of online moves, :mod:`orchestrator.elastic.gate`) until the worker has committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator.connections import Target, connect
from orchestrator.elastic.gate import WriteGate
from orchestrator.exceptions import NodeError
from orchestrator.fragments import SHARD_SCHEMA, Fragment

log = logging.getLogger(__name__)

RETRY_FOR_S = 180.0  # long enough for a Patroni failover on real hosts (ttl 20-30 s)
RETRYABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


@dataclass(frozen=True)
class BatchCounts:
    staged: int = 0  # rows sent
    inserted: int = 0  # new keys
    updated: int = 0  # stored value replaced by a different one
    distinct: int = 0  # distinct keys in the batch
    partitions: int = 0  # time partitions created for the batch
    retries: int = 0

    @property
    def superseded(self) -> int:
        """Rows replaced by a later row of the same key in the same batch."""
        return self.staged - self.distinct

    @property
    def unchanged(self) -> int:
        return self.distinct - self.inserted - self.updated


class FragmentWriter:
    """Owns one worker connection and one coordinator gate connection; used from one thread."""

    def __init__(self, fragment: Fragment, target: Target, coordinator: Target | None) -> None:
        self.fragment = fragment
        self.target = target
        self.coordinator = coordinator
        self.parent = f"{SHARD_SCHEMA}.{fragment.shard_name}"
        self.table = sql.Identifier(SHARD_SCHEMA, fragment.shard_name)
        self.stage = sql.Identifier(f"bs_stage_{fragment.shard_name}")
        self._conn: psycopg.Connection | None = None
        self._gate: WriteGate | None = None
        self.gate_version: int | None = None

    # -- connections -------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.target, f"ingest:{self.fragment.shard_name}")
            with conn.transaction():
                # Our bulk upsert replaces values itself; the per-row replace trigger is for SQL clients.
                conn.execute("SET session_replication_role = replica")
                conn.execute(
                    sql.SQL(
                        'CREATE TEMP TABLE IF NOT EXISTS {} (building text COLLATE "C", meter text, ts timestamptz, '
                        "kwh double precision, seq bigint GENERATED ALWAYS AS IDENTITY)"
                    ).format(self.stage)
                )
            self._conn = conn
        return self._conn

    def gate(self) -> WriteGate | None:
        if self.coordinator is None:
            return None
        if self._gate is None or self._gate.closed:
            self._gate = WriteGate(self.coordinator, f"ingest:gate:{self.fragment.shard_name}")
            self._gate.version = self.gate_version if self.gate_version is not None else -1
        return self._gate

    def _reset(self) -> None:
        for closable in (self._conn, self._gate):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # closing a broken connection may fail in any way
                    log.debug("closing a broken connection failed", exc_info=True)
        self._conn = None
        self._gate = None

    # -- one batch ---------------------------------------------------------------------------

    def write(self, csv_lines: list[bytes]) -> BatchCounts:
        """Apply one batch, retrying on lost connections until RETRY_FOR_S has passed."""
        deadline = time.monotonic() + RETRY_FOR_S
        retries = 0
        delay = 0.1
        while True:
            try:
                gate = self.gate()
                if gate is None:
                    counts = self._apply(csv_lines)
                else:
                    with gate.batch([self.fragment.fragment_id]):
                        counts = self._apply(csv_lines)
                return BatchCounts(counts.staged, counts.inserted, counts.updated, counts.distinct, counts.partitions, retries)
            except (*RETRYABLE, NodeError) as exc:
                self._reset()
                if time.monotonic() + delay > deadline:
                    raise NodeError(
                        f"{self.fragment.shard_name} on {self.fragment.node}: gave up after {retries} retries: {exc}"
                    ) from exc
                retries += 1
                log.info("batch on %s not confirmed (%s); retrying in %.1f s", self.fragment.shard_name, str(exc).strip(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _apply(self, csv_lines: list[bytes]) -> BatchCounts:
        conn = self._connection()
        with conn.transaction():
            conn.execute(sql.SQL("TRUNCATE {}").format(self.stage))
            with conn.cursor().copy(
                sql.SQL("COPY {} (building, meter, ts, kwh) FROM STDIN (FORMAT csv)").format(self.stage)
            ) as copy:
                copy.write(b"\n".join(csv_lines) + b"\n")
        created = self._ensure_partitions(conn)
        with conn.transaction():
            row = conn.execute(self._upsert_sql()).fetchone()
        assert row is not None
        return BatchCounts(len(csv_lines), int(row[0]), int(row[1]), int(row[2]), created)

    def _ensure_partitions(self, conn: psycopg.Connection) -> int:
        """Create the time partitions the staged rows need, in their own short transaction so the
        brief DDL locks are not held for the upsert. Only the partitions of timestamps present
        are made (an outlier year does not create every month in between)."""
        with conn.transaction():
            row = conn.execute(
                sql.SQL(
                    "SELECT coalesce(sum(buildsmart.ensure_time_partitions(%(parent)s::regclass, %(iv)s::interval, s, s)), 0) "
                    "FROM (SELECT DISTINCT buildsmart.partition_start(%(iv)s::interval, h) AS s FROM "
                    "  (SELECT DISTINCT date_trunc('hour', ts, 'UTC') AS h FROM {}) hours) starts"
                ).format(self.stage),
                {"parent": self.parent, "iv": self.fragment.time_interval},
            ).fetchone()
        created = int(row[0]) if row else 0
        if created:
            log.info("created %d time partition(s) on %s", created, self.fragment.shard_name)
        return created

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
        self._reset()

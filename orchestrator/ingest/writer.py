"""Writes one stream's parts of batches on its fragment's worker.

Two ways to write, chosen per row by the session (:mod:`.fastpath`):

- rows whose keys are new: a plain ``COPY`` into the fragment, inside a savepoint;
- the rest (resent or corrected readings, repeats inside the batch): COPY into a staging table and
  one set-based upsert where the latest value of a (building, meter, ts) wins — inside the batch
  (the highest line wins) and against what is stored (a changed value replaces it, an equal one is
  left alone, so loading the same file again writes nothing). PostgreSQL 18's ``RETURNING old.*``
  tells new rows from replaced ones.

If the COPY meets a stored key (unique_violation: the high-water mark was stale, e.g. another
writer), the savepoint is rolled back and the whole part goes through the upsert, and the writer
reads the stored high-water marks of the part's meters so the next batches decide right.

Exactly once in effect: both ways end in the same table state, a fragment's parts are applied in
order, and a part whose commit outcome is unknown (connection lost, worker restarted, failover) is
applied again, always with the upsert, on a new connection, which follows the group's primary: if
the first attempt committed, the upsert finds every row unchanged. Each part holds the fragment's
write lock on the coordinator (the switch protocol of online moves, :mod:`orchestrator.elastic.gate`)
until the worker has committed.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from psycopg import sql

from orchestrator.connections import BULK_LOAD_APP, Target, connect
from orchestrator.elastic.gate import WriteGate
from orchestrator.exceptions import NodeError
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.ingest.fastpath import NO_ROWS

log = logging.getLogger(__name__)

RETRY_FOR_S = 180.0  # long enough for a Patroni failover on real hosts (ttl 20-30 s)
RETRYABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)
HOUR_US = 3_600_000_000
COPY_BINARY = "COPY {} (building, meter, ts, kwh) FROM STDIN (FORMAT binary)"
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, no extension
BINARY_TRAILER = struct.pack(">h", -1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Pair = tuple[str, str]


@dataclass(frozen=True, eq=False)
class LeafMap:
    """A fragment's time partitions: ``[starts[i], ends[i])`` in µs since 1970 is table ``names[i]``."""

    starts: np.ndarray
    ends: np.ndarray
    names: tuple[str, ...]

    def leaf_of(self, instants: np.ndarray) -> np.ndarray:
        """Index into ``names`` of each instant's partition, -1 where none is known."""
        if not len(self.starts):
            return np.full(len(instants), -1, dtype=np.int64)
        at = np.searchsorted(self.starts, instants, side="right") - 1
        inside = (at >= 0) & (instants < self.ends[np.maximum(at, 0)])
        return np.where(inside, at, -1)


NO_LEAVES = LeafMap(np.zeros(0, np.int64), np.zeros(0, np.int64), ())
Segment = tuple[str | None, int, int]  # time partition (None: the fragment), byte range in Part.fast


@dataclass(frozen=True, eq=False)
class Part:
    """One stream's share of a batch: CSV lines (``building,meter,ts,kwh``) ready for COPY."""

    fast: bytes  # rows whose keys are new: plain COPY, as COPY BINARY tuples
    fast_rows: int
    segments: tuple[Segment, ...]  # where each run of ``fast`` goes
    slow: bytes  # rows for the upsert, in line order
    slow_rows: int
    hours: np.ndarray  # distinct hours (since 1970) of all rows: the time partitions they need
    pairs: tuple[Pair, ...]  # (building, meter) of the rows, read back after a fallback
    # (building, meter, first, last instant in µs) of the rows: noted for the rollups in the same
    # transaction (orchestrator.energy.rollups)
    changes: tuple[tuple[str, str, int, int], ...] = ()

    @property
    def rows(self) -> int:
        return self.fast_rows + self.slow_rows


@dataclass(frozen=True)
class BatchCounts:
    staged: int = 0  # rows sent
    inserted: int = 0  # new keys
    updated: int = 0  # stored value replaced by a different one
    distinct: int = 0  # distinct keys in the batch
    partitions: int = 0  # time partitions created for the batch
    retries: int = 0
    copied: int = 0  # rows written by the plain COPY
    fell_back: bool = False  # the COPY met a stored key; everything went through the upsert
    marks: Mapping[Pair, int] = field(default_factory=dict)  # stored high-water marks read after a fallback

    @property
    def superseded(self) -> int:
        """Rows replaced by a later row of the same key in the same batch."""
        return self.staged - self.distinct

    @property
    def unchanged(self) -> int:
        return self.distinct - self.inserted - self.updated


class FragmentWriter:
    """Owns one worker connection and one coordinator gate connection; used from one thread."""

    def __init__(
        self,
        fragment: Fragment,
        target: Target,
        coordinator: Target | None,
        leaf_maps: dict[int, LeafMap] | None = None,
        bulk: bool = False,
    ) -> None:
        self.fragment = fragment
        # A bulk load (a file, not a stream) says so in its application name: the rollups task
        # defers refreshing while one writes (energy/task.py BULK_LOAD_MAX_LAG_S).
        self.application = f"{BULK_LOAD_APP if bulk else 'ingest'}:{fragment.shard_name}"
        # Shared with the session, which cuts new rows by time partition: a COPY straight into
        # the partition costs about a fifth less server CPU than routing through the fragment
        # (measured). Replaced whole, never changed in place, so no lock is needed.
        self.leaf_maps = leaf_maps if leaf_maps is not None else {}
        self.target = target
        self.coordinator = coordinator
        self.parent = f"{SHARD_SCHEMA}.{fragment.shard_name}"
        self.table = sql.Identifier(SHARD_SCHEMA, fragment.shard_name)
        self.stage = sql.Identifier(f"bs_stage_{fragment.shard_name}")
        copy = "COPY {} (building, meter, ts, kwh) FROM STDIN (FORMAT csv)"
        self._copy_sql = sql.SQL(COPY_BINARY).format(self.table)  # composed once: composing costs on every batch
        self._stage_copy_sql = sql.SQL(copy).format(self.stage)
        self._stage_binary_sql = sql.SQL(COPY_BINARY).format(self.stage)
        self._truncate_sql = sql.SQL("TRUNCATE {}").format(self.stage)
        self._upsert_stmt = self._upsert_sql()
        self._conn: psycopg.Connection | None = None
        self._notes = False  # the worker's extension has the rollup change log
        self._gate: WriteGate | None = None
        self.gate_version: int | None = None

    # -- connections -------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = connect(self.target, self.application)
            with conn.transaction():
                # Both ways replace values themselves; the per-row replace trigger is for SQL clients.
                conn.execute("SET session_replication_role = replica")
                conn.execute(
                    sql.SQL(
                        'CREATE TEMP TABLE IF NOT EXISTS {} (building text COLLATE "C", meter text, ts timestamptz, '
                        "kwh double precision, seq bigint GENERATED ALWAYS AS IDENTITY)"
                    ).format(self.stage)
                )
                row = conn.execute("SELECT pg_catalog.to_regclass('buildsmart.rollup_changes') IS NOT NULL").fetchone()
                self._notes = bool(row and row[0])
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

    # -- one part ----------------------------------------------------------------------------

    def write(self, part: Part) -> BatchCounts:
        """Apply one part, retrying on lost connections until RETRY_FOR_S has passed. A retry
        always upserts: the first attempt may have committed."""
        deadline = time.monotonic() + RETRY_FOR_S
        retries = 0
        delay = 0.1
        while True:
            try:
                gate = self.gate()
                held: AbstractContextManager[None] = nullcontext() if gate is None else gate.batch([self.fragment.fragment_id])
                with held:
                    counts = self._apply(part, upsert_only=retries > 0)
                return replace(counts, retries=retries)
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

    def _apply(self, part: Part, upsert_only: bool) -> BatchCounts:
        conn = self._connection()
        created = self._ensure_partitions(conn, part.hours)
        copied = 0
        fell_back = False
        marks: dict[Pair, int] = {}
        inserted = updated = distinct = 0
        with conn.transaction():
            if part.fast_rows and not upsert_only:
                try:
                    with conn.transaction():  # a savepoint: a stored key undoes only the COPY
                        self._copy_segments(conn, part)
                    copied = part.fast_rows
                except psycopg.errors.UndefinedTable:  # a partition was dropped (retention) since
                    self.leaf_maps.pop(self.fragment.fragment_id, None)
                    fell_back = True
                except psycopg.errors.UniqueViolation:
                    fell_back = True
                    log.info("%s: %d rows thought new meet stored keys; upserting them", self.fragment.shard_name, part.fast_rows)
            if copied or not part.fast_rows:
                if part.slow:
                    inserted, updated, distinct = self._upsert(conn, part.slow, b"")
            else:
                inserted, updated, distinct = self._upsert(conn, part.slow, part.fast)
            if fell_back:
                marks = self._stored_marks(conn, part.pairs)
            if self._notes and part.changes:
                self._note_changes(conn, part.changes)
            self.before_commit()
        self.after_commit()
        return BatchCounts(part.rows, copied + inserted, updated, copied + distinct, created, 0, copied, fell_back, marks)

    def _note_changes(self, conn: psycopg.Connection, changes: tuple[tuple[str, str, int, int], ...]) -> None:
        """The rollups' change log: one row per (building, meter) of the part, committed with it."""
        b, m, lo, hi = zip(*changes, strict=True)
        conn.execute(
            "INSERT INTO buildsmart.rollup_changes (shard, building, meter, ts_from, ts_to) "
            "SELECT %s, u.b, u.m, 'epoch'::timestamptz + u.lo * interval '1 microsecond', "
            "'epoch'::timestamptz + u.hi * interval '1 microsecond' "
            "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[]) AS u(b, m, lo, hi)",
            (self.fragment.shard_name, list(b), list(m), list(lo), list(hi)),
        )

    def before_commit(self) -> None:
        """Test seam: runs inside the transaction, just before COMMIT."""

    def after_commit(self) -> None:
        """Test seam: runs after COMMIT, before the outcome is reported (a lost reply lands here)."""

    def _copy_into(self, conn: psycopg.Connection, statement: sql.Composed, data: bytes | memoryview) -> None:
        with conn.cursor().copy(statement) as copy:
            copy.write(data)

    def _copy_segments(self, conn: psycopg.Connection, part: Part) -> None:
        with memoryview(part.fast) as data:
            for leaf, start, end in part.segments:
                statement = self._copy_sql if leaf is None else sql.SQL(COPY_BINARY).format(sql.Identifier(SHARD_SCHEMA, leaf))
                with conn.cursor().copy(statement) as copy:
                    copy.write(BINARY_HEADER)
                    copy.write(data[start:end])
                    copy.write(BINARY_TRAILER)

    def _upsert(self, conn: psycopg.Connection, csv_rows: bytes, binary_rows: bytes) -> tuple[int, int, int]:
        """Stage the rows (their keys are distinct between the two kinds, so their order does not
        matter across kinds) and apply them with the latest-wins upsert."""
        conn.execute(self._truncate_sql)
        if csv_rows:
            self._copy_into(conn, self._stage_copy_sql, csv_rows)
        if binary_rows:
            with conn.cursor().copy(self._stage_binary_sql) as copy:
                copy.write(BINARY_HEADER)
                copy.write(binary_rows)
                copy.write(BINARY_TRAILER)
        row = conn.execute(self._upsert_stmt).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def _stored_marks(self, conn: psycopg.Connection, pairs: tuple[Pair, ...]) -> dict[Pair, int]:
        """The latest stored instant of each (building, meter): one index probe per pair."""
        rows = conn.execute(
            sql.SQL(
                "SELECT u.b, u.m, (SELECT max(r.ts) FROM {} r WHERE r.building = u.b AND r.meter = u.m) "
                "FROM unnest(%s::text[], %s::text[]) AS u(b, m)"
            ).format(self.table),
            ([p[0] for p in pairs], [p[1] for p in pairs]),
        ).fetchall()
        return {(b, m): NO_ROWS if ts is None else (ts - _EPOCH) // timedelta(microseconds=1) for b, m, ts in rows}

    def _ensure_partitions(self, conn: psycopg.Connection, hours: np.ndarray) -> int:
        """Create the time partitions the rows need, in their own short transaction so the brief
        DDL locks are not held for the write. Only the partitions of hours present are made (an
        outlier year does not create every month in between). Hours inside partitions known from
        the fragment's partition map are not asked about again; after a change the map is re-read."""
        leaves = self.leaf_maps.get(self.fragment.fragment_id, NO_LEAVES)
        hours = hours[leaves.leaf_of(hours * HOUR_US) < 0]
        if not len(hours):
            return 0
        as_array = "{" + ",".join(map(str, hours.tolist())) + "}"  # one text parameter: fast to send
        with conn.transaction():
            row = conn.execute(
                "SELECT coalesce(sum(buildsmart.ensure_time_partitions(%(parent)s::regclass, %(iv)s::interval, s, s)), 0) "
                "FROM (SELECT DISTINCT buildsmart.partition_start(%(iv)s::interval, to_timestamp(h * 3600)) AS s "
                "      FROM unnest(%(hours)s::bigint[]) h) starts",
                {"parent": self.parent, "iv": self.fragment.time_interval, "hours": as_array},
            ).fetchone()
            leaves = self._read_leaves(conn)
        # Shared only once committed: the fragment's other writers skip creating what the map
        # shows, and a partition their snapshot cannot see yet would route their rows to DEFAULT.
        self.leaf_maps[self.fragment.fragment_id] = leaves
        created = int(row[0]) if row else 0
        if created:
            log.info("created %d time partition(s) on %s", created, self.fragment.shard_name)
        return created

    def _read_leaves(self, conn: psycopg.Connection) -> LeafMap:
        """The fragment's time partitions and their bounds, from the catalog."""
        rows = conn.execute(
            "SELECT c.relname, (extract(epoch FROM b[1]::timestamptz) * 1000000)::bigint, "
            "       (extract(epoch FROM b[2]::timestamptz) * 1000000)::bigint "
            "FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid, "
            "     regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\) TO \\(''([^'']*)''\\)') b "
            "WHERE i.inhparent = %s::regclass AND b IS NOT NULL ORDER BY 2",
            (self.parent,),
        ).fetchall()
        starts = np.array([r[1] for r in rows], dtype=np.int64)
        return LeafMap(starts, np.array([r[2] for r in rows], dtype=np.int64), tuple(r[0] for r in rows))

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

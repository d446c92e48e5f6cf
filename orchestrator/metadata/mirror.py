"""The mirror: applies the devices outbox to MongoDB, in seq order, exactly once in effect.

One mirror per outbox at a time (a session advisory lock). Every cycle first acknowledges the
batch MongoDB's checkpoint says it committed (the crash window between MongoDB's commit and
PostgreSQL's delete), then moves batches: MongoDB transaction (documents + checkpoint), then
delete from the outbox. Any failure of PostgreSQL, MongoDB or the mirror itself leaves the outbox
rows in place, so the next cycle (or the next mirror) resumes where MongoDB actually is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from orchestrator import topology
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.metadata import outbox
from orchestrator.metadata.sink import MongoSink
from orchestrator.metadata.sink import connect as mongo_connect
from orchestrator.runtime import mongo

log = logging.getLogger(__name__)

DEFAULT_BATCH = 500
POLL_INTERVAL_S = 1.0
MAX_BACKOFF_S = 5.0
CHANNEL = "bsmirror_devices"


def pg_connect(directory: Path, purpose: str, *, autocommit: bool = False) -> psycopg.Connection:
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    return connect(superuser_target(topo.coordinator, creds), purpose, autocommit=autocommit)


def make_sink(conn: psycopg.Connection, client: MongoClient[dict[str, Any]], config: mongo.MongoConfig) -> MongoSink:
    """The MongoDB side for this cluster's outbox (installing the outbox if needed)."""
    outbox.ensure_outbox(conn)
    epoch = outbox.epoch(conn)
    if not conn.autocommit:
        conn.commit()
    sink = MongoSink(client, config.database, outbox.STREAM, epoch)
    sink.require_replica_set()
    return sink


class Mirror:
    """Holds the PostgreSQL connections, the MongoDB sink and the mirror lock."""

    def __init__(self, directory: Path, batch_size: int = DEFAULT_BATCH) -> None:
        self.directory = directory.resolve()
        self.batch_size = batch_size
        self.config = mongo.require_config(self.directory)
        self.client = mongo_connect(self.config)
        self.conn: psycopg.Connection | None = None
        self.session_conn: psycopg.Connection | None = None  # holds the lock, receives NOTIFY
        self.sink: MongoSink | None = None
        self.applied = 0

    def close(self) -> None:
        for conn in (self.conn, self.session_conn):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self.conn = self.session_conn = None
        self.client.close()

    def _reset_pg(self) -> None:
        for conn in (self.conn, self.session_conn):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self.conn = self.session_conn = None

    def _ensure_connected(self) -> tuple[psycopg.Connection, MongoSink]:
        if self.conn is None or self.session_conn is None or self.conn.closed or self.session_conn.closed:
            self._reset_pg()
            session_conn = pg_connect(self.directory, "mirror-lock", autocommit=True)
            self.session_conn = session_conn
            holder = session_conn.execute("SELECT pg_try_advisory_lock(%s)", (outbox.MIRROR_LOCK_KEY,)).fetchone()
            if not holder or not holder[0]:
                other = session_conn.execute(
                    "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = (%s::bigint & 4294967295)::oid",
                    (outbox.MIRROR_LOCK_KEY,),
                ).fetchone()
                self._reset_pg()
                who = f"backend pid {other[0]} ({other[1]})" if other else "another session"
                raise ClusterStateError(f"another mirror is already running for this cluster: {who}")
            session_conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            conn = pg_connect(self.directory, "mirror")
            self.conn = conn
            outbox.ensure_outbox(conn)
            log.info("mirror connected to PostgreSQL and holds the mirror lock")
        if self.sink is None:
            self.sink = make_sink(self.conn, self.client, self.config)
        return self.conn, self.sink

    def catch_up(self, stop: threading.Event | None = None) -> int:
        """Apply every committed event; returns how many were applied by this call."""
        conn, sink = self._ensure_connected()
        applied = 0
        committed = sink.committed_seqs()
        if committed:
            acked = outbox.acknowledge(conn, committed)
            if acked:
                log.info("acknowledged %d events MongoDB had committed before a crash (seq <= %d)", acked, max(committed))
        while stop is None or not stop.is_set():
            events = outbox.fetch(conn, self.batch_size)
            if not events:
                break
            sink.apply(events)
            outbox.acknowledge(conn, [ev.seq for ev in events])
            applied += len(events)
            log.info("mirrored %d events (seq %d..%d)", len(events), events[0].seq, events[-1].seq)
        self.applied += applied
        return applied

    def wait_for_changes(self, timeout: float) -> None:
        if self.session_conn is None:
            time.sleep(timeout)
            return
        for _ in self.session_conn.notifies(timeout=timeout, stop_after=1):
            pass

    def run(self, stop: threading.Event) -> None:
        """Continuously: catch up, then sleep until NOTIFY or the poll interval; retries failures."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.catch_up(stop)
                backoff = 0.5
                self.wait_for_changes(POLL_INTERVAL_S)
            except ClusterStateError:
                raise
            except (psycopg.Error, NodeError) as exc:
                log.warning("PostgreSQL unavailable (%s); retrying in %.1f s", _one_line(exc), backoff)
                self._reset_pg()
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except PyMongoError as exc:
                log.warning("MongoDB unavailable (%s); retrying in %.1f s", _one_line(exc), backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def run_once(directory: Path, batch_size: int = DEFAULT_BATCH) -> int:
    """Catch up and return the number of events applied; errors become NodeError."""
    mirror = Mirror(directory, batch_size)
    try:
        return mirror.catch_up()
    except PyMongoError as exc:
        raise NodeError(f"MongoDB failed during the mirror run: {_one_line(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise NodeError(f"PostgreSQL failed during the mirror run: {_one_line(exc)}") from exc
    finally:
        mirror.close()


def mirror_lag(directory: Path) -> dict[str, Any] | None:
    """Events and seconds the mirror is behind, for `buildsmart status`; None if never set up."""
    with pg_connect(directory, "mirror-lag", autocommit=True) as conn:
        lag = outbox.lag(conn)
    return lag.as_dict() if lag else None

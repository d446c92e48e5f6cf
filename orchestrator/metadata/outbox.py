"""The PostgreSQL side of the mirror: the outbox DDL, reading events, acknowledging them, lag.

Why an outbox and not logical decoding: see docs/metadata.md. In short, it needs no
``wal_level=logical``, no replication slot that pins WAL while the mirror is down, no replication
privilege, and it is ordinary table data, so it survives a Patroni failover with the primary.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orchestrator.sqlbuild import SQL_DIR

log = logging.getLogger(__name__)

DDL_PATH = SQL_DIR / "app" / "devices_outbox.sql"
STREAM = "devices"
# Serialises concurrent DDL runs (CREATE OR REPLACE TRIGGER races with itself).
_DDL_LOCK_KEY = 0x62736D6972726F72  # "bsmirror"
# Held for its whole session by the one mirror that may apply events.
MIRROR_LOCK_KEY = 0x62736D6972726F73


@dataclass(frozen=True)
class Event:
    seq: int
    entity_id: str
    op: str  # upsert | delete | truncate
    doc: dict[str, Any] | None


@dataclass(frozen=True)
class Lag:
    events: int
    seconds: float
    applied_events: int
    last_applied_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "applied_events": self.applied_events,
            "last_applied_at": self.last_applied_at.isoformat() if self.last_applied_at else None,
        }


def _ddl() -> tuple[str, str]:
    text = DDL_PATH.read_text()
    return text, hashlib.sha256(text.encode()).hexdigest()


def installed(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('bsmirror.outbox') IS NOT NULL").fetchone()
    return bool(row and row[0])


def ensure_outbox(conn: psycopg.Connection) -> None:
    """Install or upgrade the outbox DDL if the file changed since it was last applied.

    Runs in its own transaction; skipped cheaply when the recorded hash matches, so callers may
    call it before every import or mirror run without taking locks on public.devices.
    """
    text, digest = _ddl()
    if installed(conn):
        row = conn.execute("SELECT value FROM bsmirror.meta WHERE key = 'ddl_sha256'").fetchone()
        if row and row[0] == digest:
            if not conn.autocommit:
                conn.commit()
            return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK_KEY,))
        first = not installed(conn)
        conn.execute(text.encode())
        if first:
            # Rows written before the triggers existed would never reach MongoDB: queue them all.
            # CREATE TRIGGER holds a lock that blocks writers until we commit, and this statement's
            # snapshot is taken after it, so no row is missed or queued twice.
            seeded = conn.execute(
                "INSERT INTO bsmirror.outbox (entity_id, op, doc)"
                " SELECT id, 'upsert', bsmirror.device_doc(building, kind, metadata) FROM public.devices ORDER BY id"
            ).rowcount
            log.info("seeded the devices outbox with the %d devices that existed before it", seeded)
        conn.execute(
            "INSERT INTO bsmirror.meta (key, value) VALUES ('ddl_sha256', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (digest,),
        )
    log.info("installed the devices outbox (bsmirror schema, triggers on public.devices), ddl %s", digest[:12])


def epoch(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT epoch::text FROM bsmirror.state WHERE name = %s", (STREAM,)).fetchone()
    if row is None:
        raise RuntimeError("bsmirror.state has no devices row; ensure_outbox() first")
    return str(row[0])


def fetch(conn: psycopg.Connection, limit: int) -> list[Event]:
    """The oldest committed events, in seq order (per entity this is commit order: see docs)."""
    with conn.transaction():
        rows = conn.execute("SELECT seq, entity_id, op, doc FROM bsmirror.outbox ORDER BY seq LIMIT %s", (limit,)).fetchall()
    return [Event(int(r[0]), r[1], r[2], r[3]) for r in rows]


def acknowledge(conn: psycopg.Connection, seqs: list[int]) -> int:
    """Forget events MongoDB has committed; idempotent (already-deleted seqs are no-ops)."""
    if not seqs:
        return 0
    with conn.transaction():
        cur = conn.execute("DELETE FROM bsmirror.outbox WHERE seq = ANY(%s)", (seqs,))
        deleted = cur.rowcount
        conn.execute(
            "UPDATE bsmirror.state SET applied_events = applied_events + %s, last_seq = greatest(last_seq, %s),"
            " last_applied_at = clock_timestamp() WHERE name = %s",
            (deleted, max(seqs), STREAM),
        )
    return deleted


def lag(conn: psycopg.Connection) -> Lag | None:
    """Events not yet in MongoDB and the age of the oldest one; None when no outbox is installed."""
    if not installed(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM bsmirror.outbox) AS events,"
            " coalesce(extract(epoch FROM clock_timestamp() - (SELECT min(created_at) FROM bsmirror.outbox)), 0)::float8"
            "   AS seconds,"
            " s.applied_events, s.last_applied_at FROM bsmirror.state s WHERE s.name = %s",
            (STREAM,),
        )
        row = cur.fetchone()
    if not conn.autocommit:
        conn.commit()
    if row is None:
        return Lag(0, 0.0, 0, None)
    return Lag(int(row["events"]), float(row["seconds"]), int(row["applied_events"]), row["last_applied_at"])


def enqueue_current(conn: psycopg.Connection, upsert_ids: list[str], delete_ids: list[str]) -> int:
    """Queue the *current* state of some entities (repair): safe whatever the mirror did meanwhile.

    Upserts carry the row as it is now; a delete is queued only if the row is still absent, and a
    row that reappeared is queued as an upsert instead.
    """
    with conn.transaction():
        ids = list(dict.fromkeys(upsert_ids + delete_ids))
        cur = conn.execute(
            "INSERT INTO bsmirror.outbox (entity_id, op, doc)"
            " SELECT d.id, 'upsert', bsmirror.device_doc(d.building, d.kind, d.metadata)"
            " FROM public.devices d WHERE d.id = ANY(%s) ORDER BY d.id FOR SHARE OF d",
            (ids,),
        )
        queued = cur.rowcount
        cur = conn.execute(
            "INSERT INTO bsmirror.outbox (entity_id, op)"
            " SELECT x.id, 'delete' FROM unnest(%s::text[]) AS x(id)"
            " WHERE NOT EXISTS (SELECT 1 FROM public.devices d WHERE d.id = x.id) ORDER BY x.id",
            (delete_ids,),
        )
        queued += cur.rowcount
        conn.execute("SELECT pg_notify('bsmirror_devices', '')")
    log.info("queued %d corrective events in the devices outbox", queued)
    return queued


def pending_ids(conn: psycopg.Connection) -> tuple[set[str], bool]:
    """Entities with events not yet applied, and whether a truncate is pending."""
    rows = conn.execute("SELECT DISTINCT entity_id, op = 'truncate' FROM bsmirror.outbox").fetchall()
    return {r[0] for r in rows if not r[1]}, any(r[1] for r in rows)

"""Which time partitions of a fragment changed since a point in the WAL.

A move or split verifies most of a fragment before its write pause and, inside the pause, only
the time partitions written since. "Written since" must not be guessed (statistics are late,
timestamps say nothing about resent readings), so it is read from the WAL: a logical slot with
the built-in ``pgoutput`` plugin over a publication of the fragment that publishes each time
partition as itself. Every insert, update and delete names its partition's OID in the first
bytes of its message; the messages are consumed and reduced to OIDs on the server, so nothing
but a handful of OIDs travels. The slot is created before the pre-pause verification (its start
is the point), drained once before the pause and once more, for the short tail, inside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from orchestrator.elastic import shardops

log = logging.getLogger(__name__)

# pgoutput protocol 1: 'I'/'U'/'D' = Byte1 type, Int32 relation OID, ...; 'T' = TRUNCATE.
_DRAIN_SQL = """
SELECT coalesce(array_agg(DISTINCT relid) FILTER (WHERE kind <> 84), '{}'), coalesce(bool_or(kind = 84), false)
  FROM (SELECT pg_catalog.get_byte(data, 0) AS kind,
               (pg_catalog.get_byte(data, 1)::bigint << 24) | (pg_catalog.get_byte(data, 2) << 16)
               | (pg_catalog.get_byte(data, 3) << 8) | pg_catalog.get_byte(data, 4) AS relid
          FROM pg_catalog.pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s)
         WHERE pg_catalog.get_byte(data, 0) IN (73, 85, 68, 84)) m
"""


def watch_name(fragment_id: int) -> str:
    return f"bs_watch_f{fragment_id}"


@dataclass
class ChangeWatch:
    """Changes to one fragment table on one node since :meth:`start`."""

    conn: psycopg.Connection
    name: str
    shard: str
    changed: set[int] = field(default_factory=set)  # OIDs of time partitions written since start
    truncated: bool = False

    def start(self) -> str:
        """(Re)create the publication and slot; returns the LSN from which changes are seen."""
        drop(self.conn, self.name)
        self.conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = false)").format(
                sql.Identifier(self.name), shardops.table(self.shard)
            )
        )
        row = self.conn.execute(
            "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')", (self.name,)
        ).fetchone()
        assert row is not None
        self.changed, self.truncated = set(), False
        log.info("watching changes of %s from %s (slot %s)", self.shard, row[0], self.name)
        return str(row[0])

    def drain(self, flush: bool = False) -> None:
        """Consume what the slot decoded so far into :attr:`changed`. Decoding stops at the WAL
        flushed to disk; ``flush`` (in the pause) first flushes everything written, so that a
        transaction committed with synchronous_commit = off is seen too."""
        if flush:
            self.conn.execute("SELECT pg_catalog.pg_logical_emit_message(false, 'buildsmart', 'pause', true)")
        row = self.conn.execute(_DRAIN_SQL, (self.name, self.name)).fetchone()
        assert row is not None
        self.changed.update(int(r) for r in row[0])
        self.truncated = self.truncated or bool(row[1])


def drop(conn: psycopg.Connection, name: str) -> None:
    """Idempotent: the slot and the publication. A session still reading the slot can only be
    the backend of a killed orchestrator (the job's run lock keeps live ones apart): end it."""
    for _ in range(50):
        row = conn.execute("SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
        if row is None:
            break
        if row[0] is not None:
            conn.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (row[0],))
            time.sleep(0.1)
            continue
        try:
            conn.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (name,))
        except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
            continue  # taken or dropped meanwhile: look again
        log.info("dropped change watch slot %s", name)
        break
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))

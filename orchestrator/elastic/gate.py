"""The loader side of the switch protocol (for ``buildsmart ingest`` and any direct writer).

Per batch, a writer opens a coordinator transaction, takes the fragment's advisory lock SHARED
through ``buildsmart.fragment_write_lock`` (which returns the catalog version), writes and commits
the batch on the worker, and only then ends the coordinator transaction. A move or split takes
the lock EXCLUSIVELY for its switch: batches in flight finish first, new ones wait (the write
pause), and when they go on the version has changed, so the writer re-reads the placements and
re-routes the batch instead of writing to the old place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psycopg

from orchestrator import catalog
from orchestrator.connections import Target, connect
from orchestrator.fragments import Fragment

log = logging.getLogger(__name__)


class RoutingChanged(Exception):
    """The catalog changed since the writer routed its batch: reload and route again."""

    def __init__(self, version: int) -> None:
        super().__init__(f"catalog version is now {version}")
        self.version = version


class WriteGate:
    """Owns one coordinator connection; used from a single thread."""

    def __init__(self, coordinator: Target, purpose: str = "ingest:gate") -> None:
        self._conn = connect(coordinator, purpose)
        self.version = -1

    def fragments(self) -> tuple[Fragment, ...]:
        """Current placements and the version they belong to (read in one snapshot)."""
        with self._conn.transaction():
            self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = self._conn.execute("SELECT version FROM buildsmart.catalog_version").fetchone()
            frags = catalog.load_fragments(self._conn)
        self.version = int(row[0]) if row else 0
        return frags

    @contextmanager
    def batch(self, fragment_ids: Iterable[int]) -> Iterator[None]:
        """Hold the fragments' write locks for the body (commit the worker side inside it).
        Raises RoutingChanged before the body when placements changed since ``fragments()``."""
        with self._conn.transaction():
            row = self._conn.execute("SELECT buildsmart.fragment_write_lock(%s)", (sorted(set(fragment_ids)),)).fetchone()
            version = int(row[0]) if row else 0
            if version != self.version:
                log.info("catalog version %d -> %d: re-routing", self.version, version)
                raise RoutingChanged(version)
            yield

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        self._conn.close()


def is_retryable(exc: BaseException) -> bool:
    """Errors a writer through the coordinator may see during a move or split and should retry:
    postgres_fdw runs remote transactions in REPEATABLE READ, so a resent reading whose key the
    split copy wrote meanwhile fails with a serialization failure (40001), as any RR conflict."""
    return isinstance(
        exc,
        psycopg.errors.UndefinedTable
        | psycopg.errors.LockNotAvailable
        | psycopg.errors.ObjectInUse
        | psycopg.errors.SerializationFailure,
    )

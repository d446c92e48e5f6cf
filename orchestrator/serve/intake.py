"""Readings that arrive over HTTP (Haystack hisWrite, POST /ingest) go into the cluster through
the one ingest API (orchestrator.ingest.api.IngestSession), on one thread of their own.

Why one long-lived session on one thread: a session is made for one thread and opening one costs
connections to every fragment; requests hand their already-checked batches to this thread and
wait for the commit. Each request's batch commits as a whole before the request is answered
(``flush``), so a 200 means every row is stored; a failed batch closes the session (the next
request opens a new one) and the request fails with what is and is not committed. Applying the
same rows again changes nothing, and a newer value wins, as for every load.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.exceptions import NodeError
from orchestrator.ingest.api import BatchFailed, CommitOutcome, IngestSession
from orchestrator.ingest.parse import ReadingBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    rows: int
    inserted: int
    replaced: int
    unchanged: int


class Intake:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self._session: IngestSession | None = None
        self._lock = threading.Lock()

    def store(self, batch: ReadingBatch) -> Stored:
        """Commit ``batch`` (blocks until committed); NodeError when it could not be."""
        return self._pool.submit(self._store, batch).result()

    def _store(self, batch: ReadingBatch) -> Stored:
        outcomes: list[CommitOutcome] = []
        if self._session is None:
            self._session = IngestSession.open(self.directory, on_commit=outcomes.append)
            log.info("HTTP intake: ingest session opened")
        session = self._session
        session.on_commit = outcomes.append
        try:
            session.submit(batch, label=batch.rows + 1)
            session.flush()
        except (BatchFailed, NodeError) as exc:
            self._close()
            raise NodeError(
                f"the request's readings may be committed in part ({exc}); sending the same request again is safe: "
                "a reading stored again with the same value changes nothing"
            ) from exc
        except Exception:
            self._close()
            raise
        return Stored(
            sum(o.rows for o in outcomes), sum(o.inserted for o in outcomes), sum(o.replaced for o in outcomes),
            sum(o.unchanged for o in outcomes),
        )  # fmt: skip

    def _close(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            finally:
                self._session = None
                log.info("HTTP intake: ingest session closed")

    def close(self) -> None:
        self._pool.submit(self._close).result()
        self._pool.shutdown(wait=True)

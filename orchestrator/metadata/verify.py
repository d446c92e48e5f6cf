"""Compare PostgreSQL and MongoDB device documents (counts and per-document hashes); repair.

Entities with events still in the outbox are reported as pending, not as differences: the mirror
has not had its turn yet. Repair never writes MongoDB directly: it queues the *current*
PostgreSQL state of each differing entity in the outbox, so corrections go through the same
ordered, checkpointed path as every other change and cannot race the running mirror.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pymongo.errors import PyMongoError

from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.metadata import outbox
from orchestrator.metadata.mirror import Mirror, make_sink, pg_connect
from orchestrator.metadata.model import document_hash, mongo_document
from orchestrator.metadata.sink import MongoSink

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    postgres_count: int = 0
    mongo_count: int = 0
    missing: list[str] = field(default_factory=list)  # in PostgreSQL, not in MongoDB
    extra: list[str] = field(default_factory=list)  # in MongoDB, not in PostgreSQL
    different: list[str] = field(default_factory=list)  # in both, documents differ
    pending: int = 0  # entities with unapplied outbox events (not compared)
    truncate_pending: bool = False

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def as_dict(self) -> dict[str, Any]:
        return {
            "postgres_count": self.postgres_count,
            "mongo_count": self.mongo_count,
            "missing": self.missing,
            "extra": self.extra,
            "different": self.different,
            "pending": self.pending,
            "ok": self.ok,
        }


def _postgres_hashes(conn: psycopg.Connection) -> tuple[dict[str, str], set[str], bool]:
    """Hashes of all device documents and the pending ids, from one snapshot."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        hashes: dict[str, str] = {}
        with conn.cursor(name="verify_devices") as cur:
            cur.itersize = 2000
            cur.execute("SELECT id, bsmirror.device_doc(building, kind, metadata) FROM public.devices")
            for entity_id, image in cur:
                hashes[entity_id] = document_hash(mongo_document(entity_id, image))
        pending, truncate = outbox.pending_ids(conn)
    return hashes, pending, truncate


def verify(conn: psycopg.Connection, sink: MongoSink) -> VerifyReport:
    outbox.ensure_outbox(conn)
    pg, pending, truncate = _postgres_hashes(conn)
    mongo: dict[str, str] = {}
    for doc in sink.devices.find({}, batch_size=2000):
        mongo[str(doc["_id"])] = document_hash(doc)
    report = VerifyReport(postgres_count=len(pg), mongo_count=len(mongo), truncate_pending=truncate)
    if truncate:
        report.pending = len(pg) + len(mongo)
        return report
    report.pending = len(pending)
    for entity_id in sorted(pg.keys() | mongo.keys()):
        if entity_id in pending:
            continue
        mine, theirs = pg.get(entity_id), mongo.get(entity_id)
        if theirs is None:
            report.missing.append(entity_id)
        elif mine is None:
            report.extra.append(entity_id)
        elif mine != theirs:
            report.different.append(entity_id)
    log.info(
        "verified devices: %d in PostgreSQL, %d in MongoDB, %d missing, %d extra, %d different, %d pending",
        report.postgres_count, report.mongo_count, len(report.missing), len(report.extra), len(report.different), report.pending,
    )  # fmt: skip
    return report


def queue_repairs(conn: psycopg.Connection, report: VerifyReport) -> int:
    """Queue corrective outbox events for every difference in ``report``; returns how many."""
    if report.ok:
        return 0
    return outbox.enqueue_current(conn, report.missing + report.different, report.extra)


@dataclass(frozen=True)
class VerifyRun:
    before: VerifyReport
    queued: int  # corrective events queued by --repair
    applied: int | None  # events applied here after queueing; None if a running mirror will
    after: VerifyReport | None  # a second comparison once the repair was applied here


def run_verify(directory: Path, repair: bool = False) -> VerifyRun:
    """`buildsmart mirror verify [--repair]`: compare, optionally queue corrections and apply them."""
    runner = Mirror(directory)
    try:
        with pg_connect(directory, "mirror-verify") as conn:
            try:
                sink = make_sink(conn, runner.client, runner.config)
                before = verify(conn, sink)
                queued = queue_repairs(conn, before) if repair else 0
                applied: int | None = None
                after = None
                if queued:
                    try:
                        applied = runner.catch_up()
                    except ClusterStateError:
                        log.info("a running mirror holds the lock: it will apply the %d queued repairs", queued)
                    else:
                        after = verify(conn, sink)
            except PyMongoError as exc:
                raise NodeError(f"MongoDB failed during verify: {exc}") from exc
    finally:
        runner.close()
    return VerifyRun(before, queued, applied, after)

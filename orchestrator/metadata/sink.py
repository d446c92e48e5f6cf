"""The MongoDB side of the mirror: one transaction per batch, with its checkpoint.

Each batch of outbox events is written in order, together with a checkpoint document naming the
batch's seqs, in one majority-acknowledged MongoDB transaction. After a crash the mirror reads the
checkpoint first and acknowledges those seqs in PostgreSQL, so a batch MongoDB committed is never
applied twice, and a batch it did not commit is simply applied again (nothing of it is visible).
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo import DeleteMany, DeleteOne, MongoClient, ReplaceOne
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.metadata.model import mongo_document
from orchestrator.metadata.outbox import Event
from orchestrator.runtime.mongo import MongoConfig

log = logging.getLogger(__name__)

COLLECTION = "devices"
CHECKPOINTS = "buildsmart_mirror"  # one document per (stream, outbox epoch)
MAJORITY = WriteConcern("majority")
SERVER_SELECTION_TIMEOUT_MS = 5000


def connect(config: MongoConfig, appname: str = "buildsmart-mirror") -> MongoClient[dict[str, Any]]:
    """A client with majority writes and retryable writes/reads, whatever the URI says."""
    try:
        return MongoClient(
            config.uri,
            w="majority",
            retryWrites=True,
            retryReads=True,
            appname=appname,
            serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
            connectTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        )
    except (PyMongoError, ValueError) as exc:
        raise ConfigError(f"bad MongoDB URI in mongo.json: {exc}") from exc


class MongoSink:
    def __init__(self, client: MongoClient[dict[str, Any]], database: str, stream: str, epoch: str) -> None:
        self.client = client
        self.db: Database[dict[str, Any]] = client.get_database(
            database, write_concern=MAJORITY, read_concern=ReadConcern("majority")
        )
        self.devices: Collection[dict[str, Any]] = self.db[COLLECTION]
        self.checkpoints: Collection[dict[str, Any]] = self.db[CHECKPOINTS]
        self.checkpoint_id = f"{stream}:{epoch}"

    def require_replica_set(self) -> None:
        """Transactions and majority writes need a replica set; say so plainly if it is not one."""
        try:
            hello = self.client.admin.command("hello")
        except PyMongoError as exc:
            raise NodeError(f"cannot reach MongoDB: {exc}") from exc
        if not hello.get("setName") and hello.get("msg") != "isdbgrid":
            raise ConfigError("the MongoDB target is not a replica set: the mirror needs transactions and majority writes")

    def committed_seqs(self) -> list[int]:
        """Seqs of the last batch MongoDB committed (to acknowledge in PostgreSQL after a crash)."""
        doc = self.checkpoints.find_one({"_id": self.checkpoint_id})
        return [int(s) for s in doc.get("seqs", [])] if doc else []

    def apply(self, events: list[Event]) -> None:
        """Write ``events`` in order plus the checkpoint, all or nothing."""
        ops: list[ReplaceOne[dict[str, Any]] | DeleteOne | DeleteMany] = []
        for ev in events:
            if ev.op == "upsert":
                ops.append(ReplaceOne({"_id": ev.entity_id}, mongo_document(ev.entity_id, ev.doc or {}), upsert=True))
            elif ev.op == "delete":
                ops.append(DeleteOne({"_id": ev.entity_id}))
            elif ev.op == "truncate":
                ops.append(DeleteMany({}))
            else:
                raise ValueError(f"unknown outbox op {ev.op!r} at seq {ev.seq}")
        checkpoint = {"_id": self.checkpoint_id, "seqs": [ev.seq for ev in events], "last_seq": events[-1].seq}

        def body(session: ClientSession) -> None:
            self.devices.bulk_write(ops, ordered=True, session=session)
            self.checkpoints.replace_one({"_id": self.checkpoint_id}, checkpoint, upsert=True, session=session)

        with self.client.start_session() as session:
            # with_transaction retries transient errors and an unknown commit result.
            session.with_transaction(body, write_concern=MAJORITY, read_concern=ReadConcern("majority"))

"""Wiring of the device metadata mirror into the cluster lifecycle: the outbox on the coordinator,
the local MongoDB-protocol server (or a given replica set) on `up`, its stop on `down`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import BuildSmartError
from orchestrator.metadata import outbox
from orchestrator.runtime import mongo
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)


def start(
    directory: Path,
    topo: Topology,
    creds: Credentials,
    *,
    mongo_uri: str | None,
    local_server: bool,
    report: Callable[[str], None],
) -> None:
    """Install the devices outbox; point the mirror at ``mongo_uri`` or start the local server."""
    with connect(superuser_target(topo.coordinator, creds), "setup:outbox", autocommit=True) as conn:
        outbox.ensure_outbox(conn)
    if mongo_uri:
        mongo.use_external(directory, mongo_uri)
        report(f"device metadata mirror: {mongo_uri}")
    elif local_server or mongo.load_config(directory) is not None:
        config = mongo.load_config(directory)
        if config is not None and not config.managed:
            return
        uri = mongo.ensure_started(directory)
        report(f"MongoDB-protocol server (SecantusDB) for the metadata mirror: {uri}")


def stop(directory: Path, report: Callable[[str], None]) -> None:
    try:
        if mongo.stop(directory):
            report("MongoDB-protocol server: stopped")
    except BuildSmartError as exc:
        log.warning("could not stop the MongoDB-protocol server: %s", exc)
        report(f"MongoDB-protocol server: {exc}")


def mongo_uri(directory: Path) -> str:
    return mongo.mongo_uri(directory)

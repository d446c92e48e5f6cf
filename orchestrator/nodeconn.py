"""A small pool of named superuser connections to the groups of one cluster."""

from __future__ import annotations

import logging
from types import TracebackType

import psycopg

from orchestrator.connections import connect, superuser_target
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)


class NodeConnections:
    """One autocommit superuser connection per group, opened on first use, closed on exit."""

    def __init__(self, topology: Topology, creds: Credentials, purpose: str) -> None:
        self.topology = topology
        self.creds = creds
        self.purpose = purpose
        self._conns: dict[str, psycopg.Connection] = {}

    def get(self, node: str) -> psycopg.Connection:
        conn = self._conns.get(node)
        if conn is None or conn.closed:
            conn = connect(superuser_target(self.topology.group(node), self.creds), self.purpose, autocommit=True)
            self._conns[node] = conn
        return conn

    @property
    def coordinator(self) -> psycopg.Connection:
        return self.get(self.topology.coordinator.name)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> NodeConnections:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

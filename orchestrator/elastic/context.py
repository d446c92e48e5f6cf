"""What every elastic operation works with: the cluster directory, its topology, credentials and
one named superuser connection per node."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from orchestrator import catalog, roles, topology
from orchestrator.connections import superuser_target
from orchestrator.exceptions import ClusterStateError
from orchestrator.fragments import Fragment
from orchestrator.nodeconn import NodeConnections
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)


@dataclass
class Elastic:
    directory: Path
    topo: Topology
    creds: Credentials
    nodes: NodeConnections

    @property
    def coord(self) -> psycopg.Connection:
        return self.nodes.coordinator

    def fragments(self) -> tuple[Fragment, ...]:
        return catalog.load_fragments(self.coord)

    def fragment(self, fragment_id: int) -> Fragment:
        for f in self.fragments():
            if f.fragment_id == fragment_id:
                return f
        raise ClusterStateError(f"no fragment {fragment_id} with an active placement")

    def conninfo(self, node: str) -> str:
        """libpq string a worker uses to reach another node (logical replication). It is stored in
        pg_subscription, so on a local cluster it names the servers' passfile instead of holding
        the password; remote servers have no passfile of ours (README: Security model)."""
        passfile = roles.passfile_of(self.directory)
        target = superuser_target(self.topo.group(node), self.creds)
        return target.conninfo("move", primary=True, search_path=None, passfile=str(passfile.path) if passfile else None)

    def reload_topology(self) -> None:
        self.topo = topology.load(self.directory)
        self.nodes.topology = self.topo


@contextmanager
def open_cluster(directory: Path, purpose: str = "elastic") -> Iterator[Elastic]:
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with NodeConnections(topo, creds, purpose) as nodes:
        yield Elastic(directory, topo, creds, nodes)

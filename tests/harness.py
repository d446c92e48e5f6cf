"""Test harness: one real cluster per shape for the whole session (Citus' style), helpers to
reach its nodes, and per-test cleanup of what each test made."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from orchestrator import cluster, topology
from orchestrator.connections import app_target, connect, superuser_target
from orchestrator.topology import Credentials, Topology

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def make_tmp_dir(prefix: str) -> Path:
    """A temp dir the unprivileged service user can traverse (pytest's own are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BUILDSMART_TEST_TMP")))
    path.chmod(0o755)
    return path


@dataclass
class ClusterHandle:
    directory: Path

    @property
    def topology(self) -> Topology:
        return topology.load(self.directory)

    @property
    def creds(self) -> Credentials:
        return topology.load_credentials(self.directory)

    @contextmanager
    def coordinator(self, admin: bool = True) -> Iterator[psycopg.Connection]:
        topo, creds = self.topology, self.creds
        target = superuser_target(topo.coordinator, creds) if admin else app_target(topo.coordinator, creds)
        with connect(target, "test", autocommit=True) as conn:
            yield conn

    @contextmanager
    def worker(self, name: str) -> Iterator[psycopg.Connection]:
        topo, creds = self.topology, self.creds
        with connect(superuser_target(topo.group(name), creds), "test", autocommit=True) as conn:
            yield conn

    def delete_buildings(self, prefix: str) -> None:
        """Remove every reading of buildings starting with ``prefix`` (per-test cleanup)."""
        with self.coordinator() as conn:
            conn.execute("DELETE FROM public.readings WHERE building LIKE %s", (prefix + "%",))


def start_cluster(prefix: str, workers: int, split_points: list[str]) -> ClusterHandle:
    directory = make_tmp_dir(prefix) / "cluster"
    cluster.up(directory, workers=workers, split_points=split_points)
    return ClusterHandle(directory)


def stop_cluster(handle: ClusterHandle) -> None:
    cluster.down(handle.directory, purge=True)
    shutil.rmtree(handle.directory.parent, ignore_errors=True)

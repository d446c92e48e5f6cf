"""Session-wide clusters: one per shape, stopped (by PID, through pg_ctl) at the end."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cluster
from tests.front import front  # noqa: F401  (the front door's session fixture)
from tests.harness import ClusterHandle, make_tmp_dir, start_cluster, stop_cluster

# Two workers, five fragments: [MIN,b3) w1, [b3,b6) w2, [b6,t) w1, [t,u) w2, [u,MAX) w1.
# Tests name their buildings with a unique token so they never see each other's rows.
MAIN_SPLIT_POINTS = ["b3", "b6", "t", "u"]
HA_SPLIT_POINTS = ["b3", "b6", "t", "u"]


@pytest.fixture(scope="session")
def main_cluster() -> Iterator[ClusterHandle]:
    # The plain shape (one server per node); the HA tests run their own Patroni-shaped cluster.
    handle = start_cluster("bs-test-", workers=2, split_points=MAIN_SPLIT_POINTS, replicas=0)
    try:
        yield handle
    finally:
        stop_cluster(handle)


@pytest.fixture(scope="session")
def ha_dir() -> Iterator[Path]:
    """The session's Patroni-shaped cluster: coordinator + 2 workers, one synchronous replica each."""
    directory = make_tmp_dir("bs-ha-") / "cluster"
    try:
        cluster.up(directory, workers=2, split_points=HA_SPLIT_POINTS, replicas=1, balancer_paused=True)
        yield directory
    finally:
        cluster.down(directory, purge=True)
        shutil.rmtree(directory.parent, ignore_errors=True)


@pytest.fixture
def token(main_cluster: ClusterHandle) -> Iterator[str]:
    """A token unique to one test; every building whose code contains it is deleted afterwards."""
    tok = uuid.uuid4().hex[:8]
    yield tok
    with main_cluster.coordinator() as conn:
        conn.execute("DELETE FROM public.readings WHERE building LIKE %s", (f"%{tok}%",))


@pytest.fixture
def building_prefix(token: str) -> str:
    """A building-code prefix unique to one test (lands in fragment [t, u))."""
    return f"t{token}_"

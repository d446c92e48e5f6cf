"""Session-wide clusters: one per shape, stopped (by PID, through pg_ctl) at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.harness import ClusterHandle, start_cluster, stop_cluster

# Two workers, four fragments; test buildings are named t<id>_..., which sort after "b" and
# before "u", so the split points put them in fragments 3 ("t...") and the rest in 1, 2, 4.
MAIN_SPLIT_POINTS = ["b3", "b6", "t", "u"]


@pytest.fixture(scope="session")
def main_cluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-test-", workers=2, split_points=MAIN_SPLIT_POINTS)
    try:
        yield handle
    finally:
        stop_cluster(handle)


@pytest.fixture
def building_prefix(main_cluster: ClusterHandle) -> Iterator[str]:
    """A building-code prefix unique to one test; its readings are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    yield prefix
    main_cluster.delete_buildings(prefix)

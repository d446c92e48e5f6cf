"""Pure planning and routing logic (no servers)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.exceptions import ClusterStateError, ConfigError
from orchestrator.fragments import Fragment, Router, initial_fragments, weighted_split_points
from orchestrator.planner import (
    AttachCoordinatorPartition,
    CreateAppSchema,
    CreateWorkerFragment,
    DesiredCluster,
    EnsureEnergySchema,
    EnsureExtension,
    EnsureForeignServer,
    EnsureUserMapping,
    MappingSpec,
    NodeSpec,
    ObservedCluster,
    RegisterFragment,
    RegisterNode,
    plan,
)

COORD = NodeSpec("coordinator", "coordinator", "127.0.0.1", "5000", "buildsmart")
W1 = NodeSpec("w1", "worker", "127.0.0.1", "5001", "buildsmart")
W2 = NodeSpec("w2", "worker", "127.0.0.1", "5002", "buildsmart")


def desired() -> DesiredCluster:
    return DesiredCluster(COORD, (W1, W2), initial_fragments(["b3", "b6"], ["w1", "w2"], "1 month"))


def complete_observation(d: DesiredCluster) -> ObservedCluster:
    return ObservedCluster(
        extension_ok=frozenset({"coordinator", "w1", "w2"}),
        app_schema=True,
        energy_schema=True,
        nodes={n.name: n for n in (COORD, W1, W2)},
        servers={w.server_name: (w.hosts, w.ports, w.dbname) for w in (W1, W2)},
        user_mappings={w.server_name: d.mapping.describe() for w in (W1, W2)},
        fragments=d.fragments,
        worker_tables=frozenset((f.node, f.shard_name) for f in d.fragments),
        coordinator_partitions=frozenset(f.shard_name for f in d.fragments),
    )


def test_plan_from_nothing_builds_everything_in_dependency_order() -> None:
    steps = plan(desired(), ObservedCluster())
    kinds = [type(s) for s in steps]
    assert kinds[:3] == [EnsureExtension] * 3
    assert kinds[3] is CreateAppSchema
    assert kinds[4] is EnsureEnergySchema  # meters and rollup tables reference the app schema's tables
    assert kinds.count(RegisterNode) == 3
    assert kinds.count(EnsureForeignServer) == 2 and kinds.count(EnsureUserMapping) == 2
    assert kinds.count(CreateWorkerFragment) == 3
    assert kinds.count(RegisterFragment) == 3
    assert kinds.count(AttachCoordinatorPartition) == 3
    # a fragment's table exists on its worker before the coordinator attaches it
    for frag in desired().fragments:
        create = next(i for i, s in enumerate(steps) if isinstance(s, CreateWorkerFragment) and s.fragment == frag)
        attach = next(i for i, s in enumerate(steps) if isinstance(s, AttachCoordinatorPartition) and s.fragment == frag)
        assert create < attach
    assert all(s.describe() for s in steps)


def test_plan_of_a_complete_cluster_is_empty() -> None:
    d = desired()
    assert plan(d, complete_observation(d)) == []


def test_moved_worker_is_repointed_not_recreated() -> None:
    d = desired()
    observed = complete_observation(d)
    moved = NodeSpec("w2", "worker", "127.0.0.1", "6002", "buildsmart")
    d2 = DesiredCluster(COORD, (W1, moved), d.fragments)
    steps = plan(d2, observed)
    assert [type(s) for s in steps] == [RegisterNode, EnsureForeignServer]
    server_step = steps[1]
    assert isinstance(server_step, EnsureForeignServer) and not server_step.create


def test_catalog_fragments_win_over_desired_layout() -> None:
    d = desired()
    observed = complete_observation(d)
    other = DesiredCluster(COORD, (W1, W2), initial_fragments(["m"], ["w1", "w2"], "1 month"))
    assert plan(other, observed) == []


def test_fragment_on_unknown_node_is_refused() -> None:
    d = desired()
    stray = (*d.fragments[:-1], Fragment(3, "b6", None, "w9"))
    observed = complete_observation(DesiredCluster(COORD, (W1, W2), stray))
    with pytest.raises(ClusterStateError, match="w9"):
        plan(d, observed)


def test_router_uses_byte_order_and_covers_everything() -> None:
    router = Router(initial_fragments(["b3", "b6"], ["w1", "w2"], "1 month"))
    assert router.route("a").fragment_id == 1
    assert router.route("b10").fragment_id == 1  # "b10" < "b3" in byte order
    assert router.route("b3").fragment_id == 2  # lower bound is inclusive
    assert router.route("b59").fragment_id == 2
    assert router.route("b6").fragment_id == 3
    assert router.route("zzz").fragment_id == 3
    assert router.route("B1").fragment_id == 1  # upper case sorts before lower case
    for code in ["", "a", "b3", "b6", "é", "b60"]:
        assert router.route(code).holds(code)


def test_router_refuses_gaps() -> None:
    with pytest.raises(ConfigError, match="gap"):
        Router([Fragment(1, None, "b3", "w1"), Fragment(2, "b4", None, "w1")])


def test_split_points_must_increase() -> None:
    with pytest.raises(ConfigError, match="increase"):
        initial_fragments(["b6", "b3"], ["w1"], "1 month")
    with pytest.raises(ConfigError, match="empty"):
        initial_fragments(["b3", ""], ["w1"], "1 month")


def test_weighted_split_points_with_equal_weights_cut_equal_ranges() -> None:
    codes = [f"b{i}" for i in range(121)]
    points = weighted_split_points(dict.fromkeys(codes, 1), 4)
    assert len(points) == 3 and list(points) == sorted(points, key=lambda p: p.encode())
    router = Router(initial_fragments(points, ["w1", "w2"], "1 month"))
    counts: dict[int, int] = {}
    for c in codes:
        fid = router.route(c).fragment_id
        counts[fid] = counts.get(fid, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_mapping_with_a_password_or_an_old_passfile_is_made_again() -> None:
    """An older cluster's mapping (password in the catalog) and a restored cluster's (the passfile
    of the original directory) are replaced by one that reads this cluster's passfile."""
    d = replace(desired(), mapping=MappingSpec("buildsmart_fdw", "/srv/c/nodes/pgpass"))
    observed = complete_observation(d)
    assert plan(d, observed) == []
    for stale in ("user=buildsmart_app password", "user=buildsmart_fdw passfile=/old/nodes/pgpass"):
        steps = plan(d, replace(observed, user_mappings={**observed.user_mappings, W2.server_name: stale}))
        assert steps == [EnsureUserMapping(W2, d.mapping)]

"""Unit tests of the pure rebalance/split planner (no servers)."""

from __future__ import annotations

import pytest

from orchestrator.elastic.rebalance import (
    FragmentLoad,
    MoveFragment,
    ObservedLoad,
    SplitFragment,
    is_balanced,
    node_bytes,
    plan_rebalance,
    simulate,
    split_point,
)
from orchestrator.exceptions import ClusterStateError


def _obs(
    frags: list[tuple[int, str, int, str | None]], nodes: tuple[str, ...], draining: frozenset[str] = frozenset()
) -> ObservedLoad:
    return ObservedLoad(tuple(FragmentLoad(fid, node, size, at) for fid, node, size, at in frags), nodes, draining)


def test_balanced_cluster_needs_nothing() -> None:
    obs = _obs([(1, "w1", 100, "b"), (2, "w2", 105, "c")], ("w1", "w2"))
    assert plan_rebalance(obs) == []


def test_moves_to_new_empty_node() -> None:
    obs = _obs([(1, "w1", 100, None), (2, "w1", 100, None), (3, "w2", 100, None), (4, "w2", 100, None)], ("w1", "w2", "w3"))
    steps = plan_rebalance(obs, tolerance=0.5)
    assert steps and all(isinstance(s, MoveFragment) and s.target == "w3" for s in steps)
    assert is_balanced(simulate(obs, steps), 0.5)


def test_plan_is_deterministic_and_pure() -> None:
    obs = _obs([(i, "w1", 10 * i, None) for i in range(1, 9)], ("w1", "w2", "w3"))
    assert plan_rebalance(obs) == plan_rebalance(obs)


def test_split_when_one_fragment_dominates() -> None:
    obs = _obs([(1, "w1", 1000, "m"), (2, "w2", 10, None)], ("w1", "w2"))
    steps = plan_rebalance(obs, tolerance=0.1)
    assert steps[0] == SplitFragment(1, "m", "w1")
    assert any(isinstance(s, MoveFragment) and s.fragment_id == -1 and s.target == "w2" for s in steps)
    after = simulate(obs, steps)
    assert abs(after["w1"] - after["w2"]) < 100


def test_no_split_when_disallowed_or_impossible() -> None:
    obs = _obs([(1, "w1", 1000, None), (2, "w2", 10, None)], ("w1", "w2"))
    assert plan_rebalance(obs) == []
    obs2 = _obs([(1, "w1", 1000, "m"), (2, "w2", 10, None)], ("w1", "w2"))
    assert plan_rebalance(obs2, allow_splits=False) == []


def test_drain_moves_everything_off() -> None:
    obs = _obs(
        [(1, "w1", 50, None), (2, "w2", 50, None), (3, "w3", 70, None), (4, "w3", 10, None)],
        ("w1", "w2", "w3"),
        frozenset({"w3"}),
    )
    steps = plan_rebalance(obs, tolerance=10.0)
    moved = {s.fragment_id for s in steps if isinstance(s, MoveFragment) and s.source == "w3"}
    assert moved == {3, 4}
    assert set(simulate(obs, steps)) == {"w1", "w2"}


def test_drain_of_last_node_refused() -> None:
    with pytest.raises(ClusterStateError):
        plan_rebalance(_obs([(1, "w1", 1, None)], ("w1",), frozenset({"w1"})))


def test_tolerance_respected_within_reach() -> None:
    obs = _obs([(i, "w1", 100, None) for i in range(1, 13)], ("w1", "w2", "w3", "w4"))
    steps = plan_rebalance(obs, tolerance=0.05)
    assert len(steps) == 9
    assert set(simulate(obs, steps).values()) == {300}


def test_node_bytes_counts_empty_nodes() -> None:
    assert node_bytes((FragmentLoad(1, "w1", 5),), ("w1", "w2")) == {"w1": 5, "w2": 0}


def test_split_point_halves_bytes() -> None:
    assert split_point([("a", 10), ("b", 10), ("c", 10), ("d", 10)]) == "c"
    assert split_point([("a", 100), ("b", 1)]) == "b"
    assert split_point([("a", 5)]) is None
    assert split_point([]) is None

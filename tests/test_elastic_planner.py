"""Unit tests of the pure planning functions of elasticity: rebalance/split plans, pause verification (no servers)."""

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
from orchestrator.elastic.verify import PreCheck, recheck_units
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


# -- which time partitions a switch must verify inside its write pause ---------------------------

_JAN, _FEB, _DEF = (
    "FOR VALUES FROM ('2025-01-01') TO ('2025-02-01')",
    "FOR VALUES FROM ('2025-02-01') TO ('2025-03-01')",
    "DEFAULT",
)


def _pre(target_feb: tuple[int, int] = (5, 50)) -> PreCheck:
    return PreCheck({_JAN: (10, 100), _FEB: (5, 50), _DEF: (0, 0)}, {_JAN: (10, 100), _FEB: target_feb, _DEF: (0, 0)})


def test_recheck_nothing_when_nothing_changed() -> None:
    layout = {_JAN: 1, _FEB: 2, _DEF: 3}
    assert recheck_units(_pre(), layout, {_JAN: 11, _FEB: 12, _DEF: 13}, set(), False) == set()


def test_recheck_written_and_unmatched_partitions() -> None:
    layout = {_JAN: 1, _FEB: 2, _DEF: 3}
    target = {_JAN: 11, _FEB: 12, _DEF: 13}
    assert recheck_units(_pre(), layout, target, {3}, False) == {_DEF}
    assert recheck_units(_pre(target_feb=(4, 40)), layout, target, set(), False) == {_FEB}
    assert recheck_units(_pre(), layout, target, {12, 99}, False) == set()  # target OIDs or other tables: not source changes


def test_recheck_falls_back_to_full_check() -> None:
    layout = {_JAN: 1, _FEB: 2, _DEF: 3}
    target = {_JAN: 11, _FEB: 12, _DEF: 13}
    assert recheck_units(_pre(), layout, target, set(), True) is None  # TRUNCATE seen
    assert recheck_units(_pre(), {**layout, "FOR VALUES FROM ('2025-03-01') TO ('2025-04-01')": 4}, target, set(), False) is None
    assert recheck_units(_pre(), layout, {_JAN: 11, _DEF: 13}, set(), False) is None  # layouts differ
    assert recheck_units(_pre(), {_JAN: 1, _DEF: 3}, {_JAN: 11, _DEF: 13}, set(), False) is None  # dropped since

"""Rebalance planning as a pure function of the observed cluster: ``plan_rebalance(observed) -> steps``.

Bytes per node are even when every node is within ``tolerance`` (a fraction of the mean) of the
mean. The planner simulates its own steps, so the plan it prints is the plan it would run; the
executor still re-observes after every step and re-plans (sizes change while ingest goes on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from orchestrator.exceptions import ClusterStateError

DEFAULT_TOLERANCE = 0.10
MAX_STEPS = 64


@dataclass(frozen=True)
class FragmentLoad:
    """One fragment as the planner sees it. ``split_at`` is the building that halves its bytes
    (None when it holds a single building and cannot be split)."""

    fragment_id: int
    node: str
    bytes: int
    split_at: str | None = None
    range_from: str | None = None
    range_to: str | None = None


@dataclass(frozen=True)
class ObservedLoad:
    fragments: tuple[FragmentLoad, ...]
    nodes: tuple[str, ...]  # active workers that may receive fragments
    draining: frozenset[str] = field(default_factory=frozenset)  # nodes that must end up empty


@dataclass(frozen=True)
class MoveFragment:
    fragment_id: int  # negative ids are the upper halves of splits planned earlier in the same plan
    source: str
    target: str
    bytes: int

    def describe(self) -> str:
        name = f"fragment {self.fragment_id}" if self.fragment_id > 0 else f"upper half of fragment {-self.fragment_id}"
        return f"move {name} ({self.bytes} bytes) from {self.source} to {self.target}"


@dataclass(frozen=True)
class SplitFragment:
    fragment_id: int
    at: str
    node: str

    def describe(self) -> str:
        return f"split fragment {self.fragment_id} on {self.node} at building {self.at!r}"


RebalanceStep = MoveFragment | SplitFragment


def node_bytes(fragments: tuple[FragmentLoad, ...], nodes: tuple[str, ...]) -> dict[str, int]:
    totals = dict.fromkeys(nodes, 0)
    for f in fragments:
        totals[f.node] = totals.get(f.node, 0) + f.bytes
    return totals


def is_balanced(totals: Mapping[str, int], tolerance: float) -> bool:
    if not totals:
        return True
    mean = sum(totals.values()) / len(totals)
    return all(abs(v - mean) <= tolerance * mean for v in totals.values())


def plan_rebalance(
    observed: ObservedLoad, tolerance: float = DEFAULT_TOLERANCE, allow_splits: bool = True
) -> list[RebalanceStep]:
    """Steps that empty draining nodes and bring bytes per node within tolerance of the mean."""
    targets = tuple(n for n in observed.nodes if n not in observed.draining)
    if not targets:
        raise ClusterStateError("no active worker left to hold fragments")
    frags = list(observed.fragments)
    steps: list[RebalanceStep] = []

    def totals() -> dict[str, int]:
        return node_bytes(tuple(f for f in frags if f.node in targets), targets)

    # Draining first: biggest fragments to the emptiest node each time.
    for f in sorted((f for f in frags if f.node not in targets), key=lambda f: -f.bytes):
        t = totals()
        dest = min(targets, key=lambda n: (t[n], n))
        steps.append(MoveFragment(f.fragment_id, f.node, dest, f.bytes))
        frags[frags.index(f)] = replace(f, node=dest)

    while len(steps) < MAX_STEPS:
        t = totals()
        if is_balanced(t, tolerance):
            break
        heavy = max(targets, key=lambda n: (t[n], n))
        light = min(targets, key=lambda n: (t[n], n))
        gap = t[heavy] - t[light]
        # A move helps when it shrinks the gap: the fragment is smaller than the gap. The best one
        # leaves the two nodes closest to each other.
        movable = [f for f in frags if f.node == heavy and 0 < f.bytes < gap]
        if movable:
            best = min(movable, key=lambda f: (abs(gap - 2 * f.bytes), f.fragment_id))
            steps.append(MoveFragment(best.fragment_id, heavy, light, best.bytes))
            frags[frags.index(best)] = replace(best, node=light)
            continue
        splittable = [f for f in frags if f.node == heavy and f.split_at is not None and f.fragment_id > 0]
        if not allow_splits or not splittable:
            break
        big = max(splittable, key=lambda f: (f.bytes, -f.fragment_id))
        assert big.split_at is not None
        steps.append(SplitFragment(big.fragment_id, big.split_at, heavy))
        # Simulated halves cannot be split again in this plan (their split points are unknown until
        # observed); the executor re-plans after the split with real sizes.
        lower = replace(big, bytes=big.bytes // 2, split_at=None)
        upper = replace(big, fragment_id=-big.fragment_id, bytes=big.bytes - big.bytes // 2, split_at=None)
        frags[frags.index(big)] = lower
        frags.append(upper)
    return steps


def simulate(observed: ObservedLoad, steps: list[RebalanceStep]) -> dict[str, int]:
    """Bytes per node after the steps (splits halve; used by tests and --dry-run output)."""
    frags = {f.fragment_id: f for f in observed.fragments}
    for s in steps:
        if isinstance(s, SplitFragment):
            f = frags[s.fragment_id]
            frags[s.fragment_id] = replace(f, bytes=f.bytes // 2)
            frags[-s.fragment_id] = replace(f, fragment_id=-s.fragment_id, bytes=f.bytes - f.bytes // 2)
        else:
            frags[s.fragment_id] = replace(frags[s.fragment_id], node=s.target)
    nodes = tuple(n for n in observed.nodes if n not in observed.draining)
    return node_bytes(tuple(frags.values()), nodes)


def split_point(distribution: list[tuple[str, int]]) -> str | None:
    """The building that halves a fragment's bytes, from (building, bytes) pairs in C order: the
    first building at which the running total reaches half. None when one building holds it all."""
    if len(distribution) < 2:
        return None
    total = sum(b for _, b in distribution)
    running = 0
    for i, (building, size) in enumerate(distribution):
        if i > 0 and running + size / 2 >= total / 2:
            return building
        running += size
    return distribution[-1][0]

"""Rebalance planning as pure functions of the observed cluster: ``plan_rebalance(observed) ->
steps`` for `buildsmart rebalance`, and ``decide(snapshot, policy) -> decision`` for the automatic
balancer (one step at a time, with its reason).

Bytes per node are even when every node is within ``tolerance`` (a fraction of the mean) of the
mean. The planner simulates its own steps, so the plan it prints is the plan it would run; the
executor still re-observes after every step and re-plans (sizes change while ingest goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from orchestrator.elastic.policy import BalancerPolicy
from orchestrator.exceptions import ClusterStateError
from orchestrator.fragments import Fragment

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


# ---------------------------------------------------------------- the automatic balancer

BalanceAction = Literal["none", "wait", "analyze", "split", "time_split", "move"]
BalancePurpose = Literal["drain", "size", "writes", "evenness", ""]


@dataclass(frozen=True)
class FragmentView:
    """One fragment as the automatic balancer sees it: cheap numbers always, split points only
    once statistics were gathered for it (``stats_known``)."""

    fragment: Fragment
    bytes: int
    rows: int
    write_rate: float | None = None  # rows written per second over the window (None: not measured yet)
    stats_known: bool = False
    split_at: str | None = None  # building split point from statistics (None: a single building)
    split_ts: datetime | None = None  # time split point (a time-partition bound) when split_at is None

    @property
    def fragment_id(self) -> int:
        return self.fragment.fragment_id

    @property
    def node(self) -> str:
        return self.fragment.node


@dataclass(frozen=True)
class BalanceSnapshot:
    fragments: tuple[FragmentView, ...]
    workers: tuple[str, ...]  # active workers (may receive fragments)
    draining: frozenset[str] = frozenset()  # inactive workers that must end up empty
    write_rate: float | None = None  # rows/s written to the whole cluster over the window
    last_operation_s: float = 0.0  # how long the balancer's last operation took
    idle_s: float = float("inf")  # since the balancer's last operation ended
    busy_for_s: float = 0.0  # how long the cluster has been writing at least busy_rows_per_s
    calm_for_s: float = float("inf")  # since the cluster last wrote at least busy_rows_per_s


@dataclass(frozen=True)
class BalanceDecision:
    action: BalanceAction
    reason: str
    fragment_id: int | None = None
    target: str | None = None  # move: destination worker
    at: str | None = None  # split: first building of the new fragment
    at_ts: datetime | None = None  # time_split: first instant of the new fragment
    analyze: tuple[int, ...] = ()  # analyze: fragments whose statistics the decision needs
    purpose: BalancePurpose = ""  # why an operation: evenness waits while the cluster is loading

    def describe(self) -> str:
        if self.action == "split":
            return f"split fragment {self.fragment_id} at building {self.at!r}: {self.reason}"
        if self.action == "time_split":
            assert self.at_ts is not None
            return f"split fragment {self.fragment_id} by time at {self.at_ts:%Y-%m-%d %H:%M %Z}: {self.reason}"
        if self.action == "move":
            return f"move fragment {self.fragment_id} to {self.target}: {self.reason}"
        return f"{self.action}: {self.reason}"


_MIN_GAIN = 0.02  # a move shifts at least this fraction of a worker's mean bytes
_MIN_SPLIT_FLOOR = 1024 * 1024


def _mb(n: float) -> str:
    return f"{n / (1024 * 1024):,.1f} MB"


def decide(snap: BalanceSnapshot, policy: BalancerPolicy) -> BalanceDecision:
    """The balancer's next step over a frozen snapshot: at most one operation, with its reason.

    Order: empty draining workers; split fragments past the size threshold; split a fragment that
    takes a disproportionate share of the writes; move fragments until bytes per worker are even
    (splitting the biggest fragment of the heaviest worker when no move fits). While the cluster
    is loading, operations are spaced so the balancer works at most ``busy_duty`` of the time.
    A decision that needs a fragment's split point asks for its statistics first ("analyze")."""
    if not snap.workers:
        return BalanceDecision("none", "no active worker")
    want = _wanted(snap, policy)
    if want.action == "none":
        return want
    if snap.write_rate is None:
        return BalanceDecision("wait", f"measuring write rates before acting (next: {want.describe()})")
    busy = snap.write_rate >= policy.busy_rows_per_s
    if busy and want.purpose in ("evenness", "writes") and snap.busy_for_s < policy.busy_defer_s:
        return BalanceDecision(
            "wait",
            f"cluster is loading at {snap.write_rate:,.0f} rows/s: this waits for the load to end "
            f"(or {policy.busy_defer_s - snap.busy_for_s:.0f} s more) (next: {want.describe()})",
        )
    if busy and policy.busy_duty < 1.0 and want.action != "analyze":
        gap = snap.last_operation_s * (1.0 / max(policy.busy_duty, 1e-3) - 1.0)
        if snap.idle_s < gap:
            return BalanceDecision(
                "wait",
                f"cluster is loading at {snap.write_rate:,.0f} rows/s (>= {policy.busy_rows_per_s:,.0f}): next operation "
                f"in {gap - snap.idle_s:.0f} s to keep the balancer under {policy.busy_duty:.0%} of the time "
                f"(next: {want.describe()})",
            )
    return want


def _split_of(view: FragmentView, reason: str, purpose: BalancePurpose) -> BalanceDecision | None:
    if view.split_at is not None and view.fragment.time_group is None:
        return BalanceDecision("split", reason, view.fragment_id, view.node, at=view.split_at, purpose=purpose)
    if view.split_ts is not None:
        return BalanceDecision("time_split", reason + "; it holds one building, so it is split by time", view.fragment_id,
                               view.node, at_ts=view.split_ts, purpose=purpose)  # fmt: skip
    return None


def _wanted(snap: BalanceSnapshot, policy: BalancerPolicy) -> BalanceDecision:
    workers = snap.workers
    frags = snap.fragments
    count = {w: 0 for w in workers}
    totals = {w: 0 for w in workers}
    for v in frags:
        count[v.node] = count.get(v.node, 0) + 1
        totals[v.node] = totals.get(v.node, 0) + v.bytes
    cap = policy.max_fragments_per_worker
    total = sum(v.bytes for v in frags)

    def lightest(exclude: str | None = None) -> str | None:
        room = [w for w in workers if w != exclude and w not in snap.draining and count[w] + 1 <= cap]
        return min(room, key=lambda w: (totals[w], count[w], w)) if room else None

    # 1. Draining workers first: biggest fragment to the lightest worker with room.
    for v in sorted((v for v in frags if v.node in snap.draining or v.node not in workers), key=lambda v: -v.bytes):
        dest = lightest()
        if dest is not None:
            return BalanceDecision(
                "move", f"{v.node} is being drained ({_mb(v.bytes)})", v.fragment_id, target=dest, purpose="drain"
            )

    def try_split(
        candidates: list[FragmentView], reason: Callable[[FragmentView], str], purpose: BalancePurpose
    ) -> BalanceDecision | None:
        need = [v.fragment_id for v in candidates if not v.stats_known]
        if need:
            return BalanceDecision("analyze", "split points needed", analyze=tuple(need), purpose=purpose)
        for v in candidates:
            if count[v.node] + 1 > cap:
                continue
            decision = _split_of(v, reason(v), purpose)
            if decision is not None:
                return decision
        return None

    # 2. Fragments past the absolute size limit: split even while the cluster is loading.
    huge = sorted((v for v in frags if v.bytes > policy.split_bytes), key=lambda v: (-v.bytes, v.fragment_id))
    found = try_split(huge, lambda v: f"{_mb(v.bytes)} is above split_bytes {_mb(policy.split_bytes)}", "size")
    if found is not None:
        return found

    # 3. A fragment with a disproportionate, sustained share of the writes.
    # Only in a steady state: the whole window below the bulk-load rate, so the tail of a load
    # (the last fragments it wrote, its average rate decaying) is not taken for a hot spot.
    rate = snap.write_rate
    steady = snap.calm_for_s >= policy.rate_window_s
    if rate is not None and steady and rate >= policy.hot_min_rows_per_s and len(workers) > 1:
        hot = sorted(
            (v for v in frags if v.write_rate is not None and v.write_rate >= policy.hot_share * rate
             and v.bytes >= policy.min_split_bytes),
            key=lambda v: -(v.write_rate or 0.0),
        )  # fmt: skip
        found = try_split(
            hot,
            lambda v: (
                f"takes {(v.write_rate or 0.0) / rate:.0%} of {rate:,.0f} rows/s written over the last "
                f"{policy.rate_window_s:.0f} s (>= {policy.hot_share:.0%})"
            ),
            "writes",
        )
        if found is not None:
            return found

    # 4. Fragments past twice their fair share (relative to the cluster's bytes now, so this
    # waits for a load to end: mid-load, the total is still growing).
    threshold = policy.split_threshold(total, len(workers))
    oversized = sorted((v for v in frags if v.bytes > threshold), key=lambda v: (-v.bytes, v.fragment_id))
    found = try_split(
        oversized,
        lambda v: (
            f"{_mb(v.bytes)} is above the split threshold {_mb(threshold)} "
            f"(twice the fair share of {len(workers)} workers x {policy.fragments_per_worker}, within "
            f"[{_mb(policy.min_split_bytes)}, {_mb(policy.split_bytes)}])"
        ),
        "evenness",
    )
    if found is not None:
        return found

    # 5. Even bytes per worker.
    if total < policy.min_cluster_bytes:
        return BalanceDecision("none", f"the cluster holds {_mb(total)}; bytes are balanced from {_mb(policy.min_cluster_bytes)}")
    mean = total / len(workers)
    spread = ", ".join(f"{w} {totals[w] / mean - 1:+.1%}" for w in sorted(workers)) if mean else ""
    if is_balanced(totals, policy.tolerance):
        return BalanceDecision("none", f"bytes per worker within ±{policy.tolerance:.0%} of the mean {_mb(mean)} ({spread})")
    heavy = max(workers, key=lambda w: (totals[w], w))
    light = lightest(exclude=heavy)
    if light is not None:
        gap = totals[heavy] - totals[light]
        # A move must narrow the gap, and by enough to matter (not an empty fragment at a time).
        movable = [v for v in frags if v.node == heavy and max(1.0, _MIN_GAIN * mean) <= v.bytes < gap]
        if movable:
            best = min(movable, key=lambda v: (abs(gap - 2 * v.bytes), v.fragment_id))
            return BalanceDecision(
                "move",
                f"{heavy} holds {_mb(totals[heavy])}, {light} {_mb(totals[light])} (mean {_mb(mean)}; {spread}); "
                f"moving {_mb(best.bytes)} evens them best",
                best.fragment_id,
                target=light,
                purpose="evenness",
            )
    # No whole fragment fits the gap: halve the biggest of the heaviest worker (the halves then
    # move). Here a fragment is split below min_split_bytes too, down to a tolerance's worth of
    # a worker, because that is the granularity evenness needs; the per-worker cap still holds.
    splittable = sorted(
        (v for v in frags if v.node == heavy and v.bytes >= max(_MIN_SPLIT_FLOOR, 2 * policy.tolerance * mean)),
        key=lambda v: (-v.bytes, v.fragment_id),
    )[:1]
    found = try_split(
        splittable,
        lambda v: (
            f"{heavy} is {totals[heavy] / mean - 1:+.1%} from the mean and no whole fragment fits the gap; "
            f"halving its biggest ({_mb(v.bytes)}) gives a move that does"
        ),
        "evenness",
    )
    if found is not None:
        return found
    return BalanceDecision("none", f"bytes per worker {spread}: no move or split narrows it further (limits: "
                                   f"{cap} fragments per worker, splits from {_mb(policy.min_split_bytes)})")  # fmt: skip

"""The automatic balancer: one look at the cluster, at most one operation, every decision logged.

Each tick: finish what a killed process left (moves, splits, re-layouts); sample every fragment
cheaply (orchestrator.elastic.observe); derive write rates from the samples of the last
``rate_window_s``; ask the pure planner (``rebalance.decide``) for the next step; if it needs a
fragment's split point, ANALYZE that fragment (a sample, not a scan) and ask again; run the step
through the online split/move machinery (write pause, verification, crash-safe jobs); record the
decision with its reason and outcome in buildsmart.balancer_log (status shows it).

Headroom for ingest: while the cluster writes faster than ``busy_rows_per_s``, operations are
spaced so the balancer works at most ``busy_duty`` of the wall time (the planner decides; this
module only measures how long operations take and how long ago the last one ended).
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator import catalog
from orchestrator.elastic import autosplit, balancer, jobs, move, observe, split
from orchestrator.elastic.context import Elastic
from orchestrator.elastic.observe import Sample, SplitPoints
from orchestrator.elastic.policy import BalancerPolicy, policy_from
from orchestrator.elastic.rebalance import BalanceDecision, BalanceSnapshot, FragmentView, decide

log = logging.getLogger(__name__)

IDLE_RELOG_S = 600.0  # an unchanged idle reason is recorded again after this long
_NUMBERS = re.compile(r"[-+]?[\d][\d,.]*")


@dataclass(frozen=True)
class TickResult:
    decision: BalanceDecision
    acted: bool
    seconds: float = 0.0
    pause_seconds: float = 0.0


def rates(history: deque[Sample], window_s: float) -> tuple[dict[int, float], float | None]:
    """Rows/s per fragment and in total between the oldest sample of the window and the newest
    (same catalog version: placements did not change between them). Pure."""
    if len(history) < 2:
        return {}, None
    new = history[-1]
    old = next((s for s in history if new.at - s.at <= window_s), history[-2])
    if old is new:
        old = history[-2]
    dt = new.at - old.at
    if dt <= 0:
        return {}, None
    before = {s.fragment.fragment_id: s.writes for s in old.fragments}
    per: dict[int, float] = {}
    for s in new.fragments:
        w0 = before.get(s.fragment.fragment_id)
        if w0 is None:
            continue
        # A counter that went down restarted (server restart or failover): count from zero.
        per[s.fragment.fragment_id] = (s.writes - w0 if s.writes >= w0 else s.writes) / dt
    return per, sum(per.values())


class AutoBalancer:
    """Keeps what must outlive one tick: recent samples (for write rates) and operation timing."""

    def __init__(self) -> None:
        self.history: deque[Sample] = deque(maxlen=512)
        self.last_operation_s = 0.0
        self.last_operation_end: float | None = None
        self.busy_since: float | None = None  # when the write rate last rose to busy_rows_per_s
        self.busy_seen = time.monotonic()  # when it was last at least busy_rows_per_s (start: unknown, assume so)
        self._idle_key: str | None = None
        self._idle_logged_at = 0.0

    def _remember(self, sample: Sample, window_s: float) -> None:
        if self.history and self.history[-1].version != sample.version:
            self.history.clear()  # placements changed: counters of different tables
        self.history.append(sample)
        while len(self.history) > 2 and sample.at - self.history[1].at > window_s:
            self.history.popleft()

    def snapshot(self, el: Elastic, sample: Sample, policy: BalancerPolicy, points: Mapping[int, SplitPoints]) -> BalanceSnapshot:
        per, total = rates(self.history, policy.rate_window_s)
        now = time.monotonic()
        if total is not None:  # unknown right after an operation: keep what was known
            if total < policy.busy_rows_per_s:
                self.busy_since = None
            else:
                self.busy_seen = now
                if self.busy_since is None:
                    self.busy_since = now
        views = tuple(
            FragmentView(
                s.fragment,
                s.bytes,
                s.rows,
                per.get(s.fragment.fragment_id) if total is not None else None,
                s.fragment.fragment_id in points,
                points[s.fragment.fragment_id].at if s.fragment.fragment_id in points else None,
                points[s.fragment.fragment_id].at_ts if s.fragment.fragment_id in points else None,
            )
            for s in sample.fragments
        )
        idle = float("inf") if self.last_operation_end is None else now - self.last_operation_end
        return BalanceSnapshot(
            views,
            catalog.active_workers(el.coord),
            catalog.inactive_workers(el.coord),
            total,
            self.last_operation_s,
            idle,
            0.0 if self.busy_since is None else now - self.busy_since,
            now - self.busy_seen,
        )

    def tick(self, el: Elastic) -> TickResult:
        coord = el.coord
        state = catalog.balancer_state(coord)
        if state.paused:
            decision = BalanceDecision("none", f"paused{': ' + state.paused_note if state.paused_note else ''}")
            self._record_idle(el, decision)
            return TickResult(decision, False)
        resumed = balancer.resume_abandoned(el) + autosplit.resume_relayouts(el)
        catalog.settle_decisions(coord)
        if resumed:
            self.history.clear()
            decision = BalanceDecision("none", f"finished {resumed} operation(s) an interrupted process left")
            return TickResult(decision, True)
        busy = [j for j in jobs.open_jobs(coord) if j.state == "running"]
        if busy:
            decision = BalanceDecision("wait", f"job {busy[0].job_id} ({busy[0].kind}) is running in another process")
            self._record_idle(el, decision)
            return TickResult(decision, False)
        policy = policy_from(state.settings)
        sample = observe.sample(el)
        observe.store(el, sample)
        if sample.unreachable:
            decision = BalanceDecision("wait", f"worker(s) {', '.join(sorted(sample.unreachable))} unreachable")
            self._record_idle(el, decision)
            return TickResult(decision, False)
        self._remember(sample, policy.rate_window_s)
        points: dict[int, SplitPoints] = {}
        decision = decide(self.snapshot(el, sample, policy, points), policy)
        if decision.action == "analyze":
            frags = sample.by_id()
            for fid in decision.analyze:
                points[fid] = observe.split_points(el, frags[fid].fragment)
            decision = decide(self.snapshot(el, sample, policy, points), policy)
        if decision.action in ("none", "wait", "analyze"):
            self._record_idle(el, decision)
            return TickResult(decision, False)
        return self._operate(el, decision)

    def _record_idle(self, el: Elastic, decision: BalanceDecision) -> None:
        """Idle decisions are recorded when their reason (numbers aside) changes, or every
        IDLE_RELOG_S, so the log shows why the balancer waits without filling up."""
        key = f"{decision.action}:{_NUMBERS.sub('#', decision.reason)}"
        now = time.monotonic()
        if key == self._idle_key and now - self._idle_logged_at < IDLE_RELOG_S:
            return
        self._idle_key, self._idle_logged_at = key, now
        catalog.log_decision(el.coord, "wait" if decision.action == "wait" else "none", decision.reason)
        catalog.prune_decisions(el.coord)
        log.info("balancer: %s", decision.describe())

    def _operate(self, el: Elastic, decision: BalanceDecision) -> TickResult:
        self._idle_key = None
        action = decision.action
        if action not in ("split", "time_split", "move") or decision.fragment_id is None:
            raise ValueError(f"not an operation: {decision.describe()}")
        detail: dict[str, object] = {}
        if decision.target:
            detail["target"] = decision.target
        if decision.at is not None:
            detail["at"] = decision.at
        if decision.at_ts is not None:
            detail["at_ts"] = decision.at_ts.isoformat()
        entry = catalog.log_decision(el.coord, action, decision.reason, fragment_id=decision.fragment_id, detail=detail)
        log.info("balancer: %s", decision.describe())
        started = time.monotonic()
        try:
            if action == "move":
                assert decision.target is not None
                moved = move.move_fragment(el, decision.fragment_id, decision.target)
                job_id, pause, rows = moved.job_id, moved.pause_seconds, moved.rows
            else:
                result = split.split_fragment(el, decision.fragment_id, decision.at, at_ts=decision.at_ts)
                job_id, pause, rows = result.job_id, result.pause_seconds, result.rows_moved
        except Exception as exc:
            self.last_operation_s = time.monotonic() - started
            self.last_operation_end = time.monotonic()
            self.history.clear()
            catalog.finish_decision(el.coord, entry, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        seconds = time.monotonic() - started
        self.last_operation_s = seconds
        self.last_operation_end = time.monotonic()
        self.history.clear()  # the copy's own writes must not count as load
        catalog.finish_decision(
            el.coord, entry, "done", job_id, seconds=round(seconds, 3), pause_seconds=round(pause, 4), rows=rows
        )
        log.info("balancer: %s done in %.1f s (write pause %.0f ms)", action, seconds, pause * 1000)
        return TickResult(decision, True, seconds, pause)


def policy_of(el: Elastic) -> BalancerPolicy:
    return policy_from(catalog.balancer_state(el.coord).settings)

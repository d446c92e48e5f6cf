"""The task runner's ``rollups`` task: every refresh interval (5 s by default), copy changed
metadata to the workers, make the rollups follow fragment operations, refresh what changed,
and apply the retention of rollups and of raw rows (each its own setting)."""

from __future__ import annotations

import logging
import time

from orchestrator.elastic import maintenance
from orchestrator.energy import reference, rollups
from orchestrator.tasks.registry import TaskContext, TaskOutcome, register

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0
# After a refresh that found changes the next one comes soon, but a refresh may use at most this
# share of the time: during a bulk load each refresh is long (it recomputes the days the load
# touched), and refreshing back to back took a third of the 2 cores from the load itself
# (measured: Cambridge file 30.8 s with rollups paused, 47.3 s refreshing back to back; with a
# fifth of the time 33.1 s vs 38.5 s, +16%, over the 15% budget for rollup upkeep: now 15%).
REFRESH_SHARE = 0.15
# While a bulk load (a file) writes on a worker, its fragments' rollups wait, up to this long after
# their oldest waiting change (rollups.defer_for_bulk_load: why).
BULK_LOAD_MAX_LAG_S = 120.0


def again_after(last_run_s: float, share: float = REFRESH_SHARE, floor_s: float = 1.0, cap_s: float = 30.0) -> float:
    """Seconds until the next refresh after one that took ``last_run_s`` and found changes: the
    refresh then takes at most ``share`` of the time, and the rollups lag a load by at most about
    ``cap_s`` plus one refresh (pure). Fewer, larger refreshes also recompute a day the load keeps
    touching fewer times."""
    return min(cap_s, max(floor_s, last_run_s * (1.0 - share) / share))


class RollupsTask:
    name = "rollups"

    def __init__(self) -> None:
        self._interval = 5.0
        self._retention_at = 0.0
        self._last_run_s = 0.0

    def interval_s(self, ctx: TaskContext) -> float:
        return self._interval

    def again_s(self) -> float:
        return again_after(self._last_run_s)

    def run(self, ctx: TaskContext) -> TaskOutcome:
        started = time.monotonic()
        try:
            return self._run(ctx)
        finally:
            self._last_run_s = time.monotonic() - started

    def _run(self, ctx: TaskContext) -> TaskOutcome:
        nodes = ctx.el.nodes
        conf = rollups.settings(nodes.coordinator)
        self._interval = conf.refresh_every_s
        if conf.paused:
            return TaskOutcome("paused (buildsmart rollups resume)")
        frags = ctx.el.fragments()
        synced = reference.sync(nodes, frags)
        rec = rollups.reconcile(nodes, defer_while_loading_s=BULK_LOAD_MAX_LAG_S)
        deferred: list[str] = []
        done = rollups.refresh(nodes, defer_while_loading_s=BULK_LOAD_MAX_LAG_S, deferred=deferred)
        parts = []
        if deferred:
            parts.append(
                f"refresh of {len(deferred)} fragment(s) deferred while a file load writes (at most {BULK_LOAD_MAX_LAG_S:.0f} s)"
            )
        if synced.workers:
            parts.append(f"metadata copied to {', '.join(synced.workers)}")
        if rec.built or rec.switched or rec.dropped:
            parts.append(f"rollups built {len(rec.built)}, switched {len(rec.switched)}, dropped {len(rec.dropped)}")
        changes = sum(r.changes for r in done)
        if changes:
            parts.append(f"{changes} change(s) refreshed into {sum(r.hourly_rows for r in done)} hourly rows")
        now = time.monotonic()
        if now >= self._retention_at:
            self._retention_at = now + RETENTION_EVERY_S
            gone = rollups.apply_retention(nodes, conf.keep_hourly, conf.keep_daily)
            if gone:
                parts.append(f"{gone} rollup row(s) past retention deleted")
            if conf.keep_raw is not None:
                expired = maintenance.plan_retention(ctx.el, conf.keep_raw)
                if expired:
                    maintenance.apply_retention(ctx.el, expired)
                    parts.append(f"{len(expired)} raw time partition(s) older than {conf.keep_raw} dropped")
        acted = bool(parts)
        return TaskOutcome("; ".join(parts) if parts else "rollups fresh", acted and changes > 0)


register("rollups")(RollupsTask)

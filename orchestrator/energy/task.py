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


class RollupsTask:
    name = "rollups"

    def __init__(self) -> None:
        self._interval = 5.0
        self._retention_at = 0.0

    def interval_s(self, ctx: TaskContext) -> float:
        return self._interval

    def again_s(self) -> float:
        return 1.0

    def run(self, ctx: TaskContext) -> TaskOutcome:
        nodes = ctx.el.nodes
        conf = rollups.settings(nodes.coordinator)
        self._interval = conf.refresh_every_s
        if conf.paused:
            return TaskOutcome("paused (buildsmart rollups resume)")
        frags = ctx.el.fragments()
        synced = reference.sync(nodes, frags)
        rec = rollups.reconcile(nodes)
        done = rollups.refresh(nodes)
        parts = []
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

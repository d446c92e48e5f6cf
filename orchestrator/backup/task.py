"""The task runner's "backup" task: scheduled base backups and cluster restore points, WAL
filing and retention, for clusters with a repository (``backup init``); a no-op for the others.

Why in the task runner: it runs on one elected process per cluster (orchestrator/tasks), so two
orchestrators never take the same backup or make two points at once. What is due is decided by
``decide.scheduled_work`` (pure, tested); the schedule is in DIR/backup.json (``backup init
--points-every/--base-every``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from orchestrator.backup import decide, ops, points, repo
from orchestrator.tasks.registry import TaskContext, TaskOutcome, register

log = logging.getLogger(__name__)

CHECK_EVERY_S = 300.0


class BackupTask:
    name = "backup"

    def interval_s(self, ctx: TaskContext) -> float:
        return CHECK_EVERY_S

    def again_s(self) -> float:
        return CHECK_EVERY_S

    def run(self, ctx: TaskContext) -> TaskOutcome:
        if not repo.exists(ctx.directory):
            return TaskOutcome("no backup repository (`buildsmart backup init`)")
        settings = repo.load(ctx.directory)
        r = settings.repo
        work = decide.scheduled_work(
            [g.name for g in ctx.el.topo.groups],
            ops.all_backups(r),
            points.load_points(r),
            settings.schedule.points_every_min,
            settings.schedule.base_every_h,
            datetime.now(UTC),
        )
        done: list[str] = []
        if work.base_backups and not ctx.stopping():
            made = ops.create(ctx.directory)
            done.append(f"base backups {', '.join(f'{g} {b}' for g, b in made.items())}")
        if work.point and not ctx.stopping():
            point = points.make_restore_point(ctx.el, points.auto_name("schedule"), "schedule")
            done.append(f"restore point {point.name} (pause {point.pause_ms:.1f} ms)")
        done += ops.maintain(ctx.directory)
        if done:
            log.info("backup task (%s): %s", work.why, "; ".join(done))
        return TaskOutcome("; ".join(done) or "nothing due", acted=bool(done))


register("backup")(BackupTask)

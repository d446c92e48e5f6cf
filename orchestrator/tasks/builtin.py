"""The periodic tasks every runner runs: the balancer, time-partition upkeep and the scheduled
integrity check."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from orchestrator import catalog, check
from orchestrator.elastic import maintenance
from orchestrator.elastic.autobalance import AutoBalancer, policy_of
from orchestrator.tasks.registry import TaskContext, TaskOutcome, register

UPKEEP_INTERVAL_S = 3600.0
CHECK_POLL_S = 600.0  # how often the runner asks whether the daily check is due

log = logging.getLogger(__name__)


class BalancerTask:
    """Splits and moves fragments so every worker carries its share (orchestrator.elastic.autobalance)."""

    name = "balancer"

    def __init__(self) -> None:
        self.balancer = AutoBalancer()
        self._interval = 5.0

    def interval_s(self, ctx: TaskContext) -> float:
        return self._interval

    def again_s(self) -> float:
        return 1.0

    def run(self, ctx: TaskContext) -> TaskOutcome:
        self._interval = policy_of(ctx.el).interval_s
        result = self.balancer.tick(ctx.el)
        return TaskOutcome(result.decision.describe(), result.acted)


class PartitionUpkeepTask:
    """Future time partitions on every fragment (what `buildsmart maintain` does), hourly."""

    name = "partition-upkeep"

    def interval_s(self, ctx: TaskContext) -> float:
        return UPKEEP_INTERVAL_S

    def again_s(self) -> float:
        return UPKEEP_INTERVAL_S

    def run(self, ctx: TaskContext) -> TaskOutcome:
        created = maintenance.ensure_future_partitions(ctx.el)
        made = sum(created.values())
        return TaskOutcome(f"{made} future time partition(s) created on {len(created)} fragment(s)", made > 0)


class IntegrityCheckTask:
    """`buildsmart check` once a day (check.SCHEDULED_EVERY after the last recorded run, whoever
    ran it): catalog, placements, replicas and pages. Findings go to the log and to status."""

    name = "integrity-check"

    def interval_s(self, ctx: TaskContext) -> float:
        return CHECK_POLL_S

    def again_s(self) -> float:
        return CHECK_POLL_S

    def run(self, ctx: TaskContext) -> TaskOutcome:
        coord = ctx.el.coord
        if not check.check_due(catalog.last_check_run(coord), catalog.cluster_created_at(coord), datetime.now(UTC)):
            return TaskOutcome("not due")
        report = check.run_check(ctx.directory)
        if not report.ok:
            log.warning("scheduled integrity check found problems: %s (details: `buildsmart check`)", report.summary())
        return TaskOutcome(report.summary(), acted=True)


register("balancer")(BalancerTask)
register("partition-upkeep")(PartitionUpkeepTask)
register("integrity-check")(IntegrityCheckTask)

# Scheduled backups and restore points (a no-op without a repository): orchestrator/backup/task.py.
from orchestrator.backup import task as _backup_task  # noqa: E402,F401

# Rollup refresh, reference-table sync and retention: orchestrator/energy/task.py.
from orchestrator.energy import task as _rollups_task  # noqa: E402,F401

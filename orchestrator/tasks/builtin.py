"""The periodic tasks every runner runs: the balancer and time-partition upkeep."""

from __future__ import annotations

from orchestrator.elastic import maintenance
from orchestrator.elastic.autobalance import AutoBalancer, policy_of
from orchestrator.tasks.registry import TaskContext, TaskOutcome, register

UPKEEP_INTERVAL_S = 3600.0


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


register("balancer")(BalancerTask)
register("partition-upkeep")(PartitionUpkeepTask)

# Scheduled backups and restore points (a no-op without a repository): orchestrator/backup/task.py.
from orchestrator.backup import task as _backup_task  # noqa: E402,F401

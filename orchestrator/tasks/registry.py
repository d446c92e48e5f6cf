"""Periodic tasks and their registry.

A task is a small object with a ``name``, an interval and a ``run`` that does one round of work
and says what it did. The runner (orchestrator.tasks.runner) runs due tasks one at a time on the
elected process; a task that acted is asked again after its short ``again_s``, an idle one after
its interval. Other periodic work (integrity checks, rollup refresh, restore points) registers a
factory here with :func:`register` and is picked up by every runner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchestrator.elastic.context import Elastic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskOutcome:
    summary: str
    acted: bool = False  # changed something: run again after ``again_s`` rather than the interval


@dataclass
class TaskContext:
    directory: Path
    el: Elastic
    stopping: Callable[[], bool]  # the runner is shutting down: finish or leave work resumable


class PeriodicTask(Protocol):
    name: str

    def interval_s(self, ctx: TaskContext) -> float:
        """Seconds between two runs when the last one found nothing to do."""
        ...

    def again_s(self) -> float:
        """Seconds until the next run after a run that acted."""
        ...

    def run(self, ctx: TaskContext) -> TaskOutcome: ...


TaskFactory = Callable[[], PeriodicTask]
_FACTORIES: dict[str, TaskFactory] = {}


def register(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: make every runner create and run this task."""

    def add(factory: TaskFactory) -> TaskFactory:
        if name in _FACTORIES:
            raise ValueError(f"periodic task {name!r} registered twice")
        _FACTORIES[name] = factory
        return factory

    return add


def create_all() -> list[PeriodicTask]:
    from orchestrator.tasks import builtin  # noqa: F401  (registers the built-in tasks)

    return [factory() for _, factory in sorted(_FACTORIES.items())]


def names() -> list[str]:
    from orchestrator.tasks import builtin  # noqa: F401

    return sorted(_FACTORIES)

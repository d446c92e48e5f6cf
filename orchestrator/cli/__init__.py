"""The ``buildsmart`` command line. Each command group lives in its own module and registers here."""

from __future__ import annotations

from orchestrator.cli import backup_cmds as _backup_cmds  # noqa: F401
from orchestrator.cli import check_cmds as _check_cmds  # noqa: F401  (registers commands)
from orchestrator.cli import cluster_cmds as _cluster_cmds  # noqa: F401
from orchestrator.cli import demo_cmds as _demo_cmds  # noqa: F401
from orchestrator.cli import elastic_cmds as _elastic_cmds  # noqa: F401
from orchestrator.cli import energy_cmds as _energy_cmds  # noqa: F401
from orchestrator.cli import ha_cmds as _ha_cmds  # noqa: F401
from orchestrator.cli import host_cmds as _host_cmds  # noqa: F401
from orchestrator.cli import ingest_cmds as _ingest_cmds  # noqa: F401
from orchestrator.cli import metadata_cmds as _metadata_cmds  # noqa: F401
from orchestrator.cli import serve_cmds as _serve_cmds  # noqa: F401
from orchestrator.cli import tasks_cmds as _tasks_cmds  # noqa: F401
from orchestrator.cli import upgrade_cmds as _upgrade_cmds  # noqa: F401
from orchestrator.cli.app import app, main

__all__ = ["app", "main"]

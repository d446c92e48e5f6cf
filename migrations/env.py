"""Alembic environment: the coordinator plus every fragment on every node in one 2PC.

The node list and fragments come from the coordinator's catalog (buildsmart.nodes, fragments,
placements); see orchestrator.elastic.migrate.run_in_env.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from orchestrator.elastic.migrate import run_in_env

if context.config.config_file_name is not None and context.config.attributes.get("configure_logger", True):
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

run_in_env(context)

"""The energy model's coordinator DDL (sql/app/energy.sql) and what the application role may do
with it. Idempotent: setup runs it on new clusters and on clusters made before it existed."""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from orchestrator.sqlbuild import SQL_DIR

log = logging.getLogger(__name__)

ENERGY_DDL = SQL_DIR / "app" / "energy.sql"
ROLLUP_TABLES = ("readings_hourly", "readings_daily")
EDITABLE = ("public.meters", "public.meter_replacements")


def ensure_coordinator_schema(conn: psycopg.Connection, app_user: str) -> None:
    role = sql.Identifier(app_user)
    with conn.transaction():
        conn.execute(ENERGY_DDL.read_text().encode())
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.meters, public.meter_replacements TO {}").format(role)
        )
        conn.execute(
            sql.SQL("GRANT SELECT ON public.readings_hourly, public.readings_daily, public.readings_monthly TO {}").format(role)
        )
    log.info("energy schema (meters, replacements, rollup tables and views) is in place on the coordinator")

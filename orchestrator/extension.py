"""Install the buildsmart extension on a node: files into the server's extension directory, then
CREATE EXTENSION (or ALTER EXTENSION UPDATE when an older version is there)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import psycopg

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION, pgbin
from orchestrator.exceptions import NodeError
from orchestrator.sqlbuild import SQL_DIR

log = logging.getLogger(__name__)


def extension_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return [sql_dir / f"{EXTENSION_NAME}.control", *sorted(sql_dir.glob(f"{EXTENSION_NAME}--*.sql"))]


def copy_files(share_dir: Path | None = None) -> Path:
    """Copy control and versioned scripts into ``<sharedir>/extension`` (local servers only)."""
    target = (share_dir or pgbin.share_dir()) / "extension"
    for src in extension_files():
        dst = target / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
            dst.chmod(0o644)
            log.info("installed %s into %s", src.name, target)
    return target


def ensure_extension(conn: psycopg.Connection, node: str) -> str:
    """CREATE or UPDATE the extension on a connected node; returns what was done."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT default_version, installed_version FROM pg_catalog.pg_available_extensions WHERE name = %s",
            (EXTENSION_NAME,),
        )
        row = cur.fetchone()
        if row is None:
            raise NodeError(
                f"extension {EXTENSION_NAME} is not available on node {node}: copy sql/{EXTENSION_NAME}.control and "
                f"sql/{EXTENSION_NAME}--*.sql into `pg_config --sharedir`/extension on that host "
                "(docker-compose.yml mounts them)"
            )
        _default, installed = row
        cur.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        if installed is None:
            cur.execute(f"CREATE EXTENSION {EXTENSION_NAME} VERSION '{EXTENSION_VERSION}'")
            action = f"created extension {EXTENSION_NAME} {EXTENSION_VERSION}"
        elif installed != EXTENSION_VERSION:
            cur.execute(f"ALTER EXTENSION {EXTENSION_NAME} UPDATE TO '{EXTENSION_VERSION}'")
            action = f"updated extension {EXTENSION_NAME} {installed} -> {EXTENSION_VERSION}"
        else:
            return f"extension {EXTENSION_NAME} {installed} present"
    log.info("%s on %s", action, node)
    return action

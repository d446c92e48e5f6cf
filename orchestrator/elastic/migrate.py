"""Alembic across the cluster: the coordinator and every fragment on every node, all or nothing.

``migrations/env.py`` calls :func:`run_in_env`. It reads the node list and fragments from the
coordinator's catalog, opens one transaction per node, runs the migration scripts (``op`` acts on
the coordinator; :func:`fleet` reaches the workers' fragments), then two-phase commits:
PREPARE TRANSACTION everywhere, COMMIT PREPARED on the coordinator first (the decision), then on
the workers. Any error before the decision rolls every node back.

The decision is a row in ``buildsmart.twophase_decisions`` on the coordinator, committed on its own
after every node (the coordinator too) has prepared: that commit is the one moment the migration
becomes committed. A crash leaves transactions named ``bsmig_<token>_<node>``; :func:`recover`
(run at the start of every migration) commits those whose token has a decision row and rolls back
all others (presumed abort), so a kill between two PREPAREs can never commit some nodes only.
"""

from __future__ import annotations

import contextvars
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog, resources, topology
from orchestrator.connections import Target, connect, superuser_target
from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.fragments import SHARD_SCHEMA, Fragment

log = logging.getLogger(__name__)

ALEMBIC_INI = resources.path("alembic.ini")
GID_PREFIX = "bsmig_"
FAULT_ENV = "BUILDSMART_FAULT"  # tests: name of a point where the process kills itself
_current: contextvars.ContextVar[Fleet] = contextvars.ContextVar("buildsmart_fleet")


@dataclass
class Fleet:
    """The worker side of one migration run: an open transaction per worker and its fragments."""

    workers: dict[str, psycopg.Connection]
    fragments: tuple[Fragment, ...]
    touched: set[str] = field(default_factory=set)

    def on_workers(self, statement: sql.Composed | sql.SQL | str) -> None:
        """Run one statement on every worker (e.g. a function or extension change)."""
        for name, conn in self.workers.items():
            conn.execute(statement.encode() if isinstance(statement, str) else statement)
            self.touched.add(name)

    def on_fragments(self, make: Callable[[str], sql.Composed]) -> None:
        """Run ``make(shard_name)`` on the node of every fragment of readings (it recurses into its
        time partitions there)."""
        for frag in self.fragments:
            self.workers[frag.node].execute(make(frag.shard_name))
            self.touched.add(frag.node)
        log.info("migration statement applied to %d fragment(s)", len(self.fragments))


def fleet() -> Fleet:
    """The fleet of the running migration (for use inside migration scripts)."""
    try:
        return _current.get()
    except LookupError as exc:
        raise ConfigError("no cluster migration is running: use `buildsmart migrate` or `alembic upgrade`") from exc


def shard_table(shard: str) -> sql.Identifier:
    return sql.Identifier(SHARD_SCHEMA, shard)


def cluster_dir(config_dir: str | None) -> Path:
    return Path(config_dir or os.environ.get("BUILDSMART_DIR", ".buildsmart")).resolve()


def _worker_targets(coord: psycopg.Connection, topo: topology.Topology, creds: topology.Credentials) -> dict[str, Target]:
    """Workers from the catalog (the source of truth), reached with the orchestrator's superuser."""
    rows = coord.execute("SELECT name, hosts, ports, dbname FROM buildsmart.nodes WHERE role = 'worker' ORDER BY name").fetchall()
    return {
        name: Target(name, hosts, ports, dbname, creds.superuser, creds.superuser_password) for name, hosts, ports, dbname in rows
    }


def _finish_prepared(target: Target, gid: str, commit: bool) -> None:
    verb = "COMMIT PREPARED" if commit else "ROLLBACK PREPARED"
    with connect(target, "migrate:2pc", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone():
            conn.execute(sql.SQL("{} {}").format(sql.SQL(verb), sql.Literal(gid)))
            log.info("%s %s on %s", verb.lower(), gid, target.group)


def _fault_point(name: str) -> None:
    """Crash injection for tests (kill -9 at a named point of the protocol)."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: exiting at %s", name)
        os._exit(137)


def _decided(coord_target: Target) -> set[str]:
    with connect(coord_target, "migrate:recover", autocommit=True) as conn:
        rows = conn.execute("SELECT token FROM buildsmart.twophase_decisions WHERE purpose = 'migration'").fetchall()
    return {r[0] for r in rows}


def _decide(coord_target: Target, token: str) -> None:
    """The commit point: after this row commits, every node's prepared transaction will commit."""
    with connect(coord_target, "migrate:decide", autocommit=True) as conn:
        conn.execute("INSERT INTO buildsmart.twophase_decisions (token, purpose) VALUES (%s, 'migration')", (token,))
    log.info("migration %s: commit decided (recorded on the coordinator)", token)


def _forget(coord_target: Target, tokens: set[str]) -> None:
    if tokens:
        with connect(coord_target, "migrate:forget", autocommit=True) as conn:
            conn.execute("DELETE FROM buildsmart.twophase_decisions WHERE token = ANY(%s)", (sorted(tokens),))


def _token_of(gid: str) -> str:
    return gid[len(GID_PREFIX) :].split("_", 1)[0]


def recover(coord_target: Target, workers: dict[str, Target]) -> int:
    """Settle prepared migration transactions a crash left behind; returns how many were settled.
    A transaction whose token has a decision row commits on every node; any other is rolled back."""

    def pending(t: Target) -> list[str]:
        with connect(t, "migrate:recover", autocommit=True) as conn:
            rows = conn.execute("SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE %s", (GID_PREFIX + "%",)).fetchall()
        return [r[0] for r in rows]

    decided = _decided(coord_target)
    settled = 0
    for name, target in [("coordinator", coord_target), *workers.items()]:
        for gid in pending(target):
            commit = _token_of(gid) in decided
            _finish_prepared(target, gid, commit=commit)
            log.info("recovered %s on %s: %s", gid, name, "committed (decided)" if commit else "rolled back (no decision)")
            settled += 1
    _forget(coord_target, decided)
    return settled


@contextmanager
def _open(directory: Path) -> Iterator[tuple[topology.Topology, topology.Credentials, Target, dict[str, Target]]]:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    coord_target = superuser_target(topo.coordinator, creds)
    with connect(coord_target, "migrate:catalog", autocommit=True) as coord:
        workers = _worker_targets(coord, topo, creds)
    yield topo, creds, coord_target, workers


def run_in_env(context: Any) -> None:
    """Body of migrations/env.py (online mode only: 2PC needs live connections)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    if context.is_offline_mode():
        raise ConfigError("offline (--sql) migrations are not supported: every node is migrated in one 2PC")
    config = context.config
    directory = cluster_dir(config.attributes.get("buildsmart_dir") or config.get_main_option("buildsmart_dir"))
    with _open(directory) as (_topo, _creds, coord_target, worker_targets):
        recover(coord_target, worker_targets)
        token = uuid.uuid4().hex[:12]
        gids = {name: f"{GID_PREFIX}{token}_{name}" for name in ("coordinator", *worker_targets)}
        engine = create_engine(
            "postgresql+psycopg://", creator=lambda: psycopg.connect(coord_target.conninfo("migrate")), poolclass=NullPool
        )
        workers = {name: connect(t, "migrate") for name, t in worker_targets.items()}
        prepared: list[str] = []
        deciding = False
        try:
            with engine.connect() as sa_conn:
                sa_conn.begin()
                raw = sa_conn.connection.dbapi_connection
                assert raw is not None
                frags = catalog.load_fragments(raw)  # type: ignore[arg-type]
                fl = Fleet(workers, frags)
                token_var = _current.set(fl)
                try:
                    context.configure(connection=sa_conn, target_metadata=None, version_table_schema="public")
                    with context.begin_transaction():
                        context.run_migrations()
                finally:
                    _current.reset(token_var)
                # Phase one: every node prepares (any order: nothing commits without the decision).
                for name, conn in workers.items():
                    conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gids[name])))
                    prepared.append(name)
                _fault_point("migrate:workers-prepared")
                sa_conn.exec_driver_sql(f"PREPARE TRANSACTION '{gids['coordinator']}'")
                prepared.append("coordinator")
                log.info("migration %s prepared on %d node(s)", token, len(prepared))
            # The decision, durable on the coordinator. If its outcome is unknown (the coordinator
            # went away), only the decision table may settle the prepared transactions.
            deciding = True
            _decide(coord_target, token)
        except BaseException as exc:
            if deciding:
                raise NodeError(
                    f"migration {token} is prepared on every node but recording the decision failed ({exc}); "
                    "run `buildsmart migrate` again: it commits everywhere if the decision was recorded, "
                    "and rolls back everywhere if not"
                ) from exc
            log.info("migration %s failed before the decision: rolling back on every node", token)
            for name in prepared:
                target = coord_target if name == "coordinator" else worker_targets[name]
                _finish_prepared(target, gids[name], commit=False)
            for conn in workers.values():
                conn.rollback()
            raise
        finally:
            for conn in workers.values():
                conn.close()
            engine.dispose()
        _fault_point("migrate:decided")
        # Phase two: commit everywhere; a crash from here on is finished by recover().
        _finish_prepared(coord_target, gids["coordinator"], commit=True)
        _fault_point("migrate:coordinator-committed")
        for name, target in worker_targets.items():
            _finish_prepared(target, gids[name], commit=True)
        _forget(coord_target, {token})
        log.info("migration %s committed on the coordinator and %d worker(s)", token, len(worker_targets))


def alembic_config(directory: Path) -> Any:
    from alembic.config import Config

    if not ALEMBIC_INI.exists():
        raise ConfigError(f"{ALEMBIC_INI} is missing")
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(resources.path("migrations")))
    cfg.attributes["buildsmart_dir"] = str(directory.resolve())
    return cfg


def run(directory: Path, revision: str = "head", downgrade: bool = False) -> None:
    """``alembic upgrade REVISION`` (or downgrade) on the cluster in DIR."""
    from alembic import command
    from alembic.util.exc import CommandError

    cfg = alembic_config(directory)
    try:
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
    except CommandError as exc:
        raise ConfigError(f"alembic: {exc}") from exc
    except psycopg.Error as exc:
        raise NodeError(f"migration failed and was rolled back on every node: {exc}") from exc


def current(directory: Path) -> str | None:
    with _open(directory.resolve()) as (_t, _c, coord_target, _w), connect(coord_target, "migrate", autocommit=True) as conn:
        if not conn.execute("SELECT pg_catalog.to_regclass('public.alembic_version') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            return None
        row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()
    return None if row is None else str(row[0])

"""``buildsmart upgrade``: move every node of a running cluster to the extension version this code
ships, all or none, then let setup finish what the new version changes on the fragments.

Each node runs ``ALTER EXTENSION buildsmart UPDATE`` in a transaction of its own; all of them are
prepared (PREPARE TRANSACTION) and then committed, coordinator first. The commit decision is a row
of ``buildsmart.twophase_decisions`` written inside the coordinator's own upgrade transaction (the
upgrade creates that table when it comes from 0.1), so it becomes durable exactly when the
coordinator's upgrade commits. A crash is settled by the next run from that row alone: decided
tokens commit everywhere, others roll back everywhere (presumed abort), as migrations do.

No restart: the C module is loaded through ``session_preload_libraries``, so new sessions load the
new build; sessions open during the upgrade keep the old one until they reconnect.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION, cluster, extension, topology
from orchestrator.connections import Target, connect, superuser_target
from orchestrator.exceptions import ClusterStateError, NodeError

log = logging.getLogger(__name__)

GID_PREFIX = "bsupg_"
FAULT_ENV = "BUILDSMART_FAULT"
Report = Callable[[str], None]


@dataclass(frozen=True)
class NodeVersion:
    node: str
    installed: str | None
    available: str | None


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: exiting at %s", name)
        os._exit(137)


def versions(topo: topology.Topology, creds: topology.Credentials) -> list[NodeVersion]:
    out = []
    for group in topo.groups:
        with connect(superuser_target(group, creds), "upgrade", autocommit=True) as conn:
            row = conn.execute(
                "SELECT installed_version, default_version FROM pg_catalog.pg_available_extensions WHERE name = %s",
                (EXTENSION_NAME,),
            ).fetchone()
        out.append(NodeVersion(group.name, row[0] if row else None, row[1] if row else None))
    return out


def _decided(coord: Target) -> set[str]:
    with connect(coord, "upgrade:recover", autocommit=True) as conn:
        if conn.execute("SELECT pg_catalog.to_regclass('buildsmart.twophase_decisions') IS NULL").fetchone() == (True,):
            return set()
        rows = conn.execute("SELECT token FROM buildsmart.twophase_decisions WHERE purpose = 'upgrade'").fetchall()
    return {str(r[0]) for r in rows}


def recover(coord: Target, targets: dict[str, Target]) -> int:
    """Settle prepared upgrade transactions a crash left: commit decided ones, roll back others."""
    decided = _decided(coord)
    settled = 0
    for name, target in targets.items():
        with connect(target, "upgrade:recover", autocommit=True) as conn:
            gids = [
                r[0] for r in conn.execute("SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE %s", (GID_PREFIX + "%",))
            ]
            for gid in gids:
                commit = gid[len(GID_PREFIX) :].split("_", 1)[0] in decided
                conn.execute(
                    sql.SQL("{} {}").format(sql.SQL("COMMIT PREPARED" if commit else "ROLLBACK PREPARED"), sql.Literal(gid))
                )
                log.info("upgrade: %s on %s %s", gid, name, "committed (decided)" if commit else "rolled back (no decision)")
                settled += 1
    if decided:
        with connect(coord, "upgrade:recover", autocommit=True) as conn:
            conn.execute("DELETE FROM buildsmart.twophase_decisions WHERE token = ANY(%s)", (sorted(decided),))
    return settled


def upgrade(directory: Path, report: Report = lambda _: None) -> list[NodeVersion]:
    """Update the extension on every node to EXTENSION_VERSION (all or none), then run setup."""
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    if any(g.managed for g in topo.groups):
        extension.copy_files()  # this host's servers get the new files and module first
    targets = {g.name: superuser_target(g, creds) for g in topo.groups}
    coord_name = topo.coordinator.name
    settled = recover(targets[coord_name], targets)
    if settled:
        report(f"settled {settled} prepared transaction(s) of an interrupted upgrade")
    before = versions(topo, creds)
    missing = [v.node for v in before if v.available is None]
    if missing:
        raise ClusterStateError(f"the extension files are not installed on {', '.join(missing)}: install them and rerun")
    stale = [v for v in before if v.installed != EXTENSION_VERSION]
    if not stale:
        report(f"every node runs {EXTENSION_NAME} {EXTENSION_VERSION}")
    else:
        _update_all(targets, coord_name, [v.node for v in stale], report)
    applied = cluster.setup(topo, creds, directory)
    for step in applied:
        report(step.describe())
    after = versions(topo, creds)
    log.info("upgrade of %s done: %s", directory, ", ".join(f"{v.node} {v.installed}" for v in after))
    return after


def _update_all(targets: dict[str, Target], coord_name: str, nodes: list[str], report: Report) -> None:
    token = uuid.uuid4().hex[:12]
    conns: dict[str, psycopg.Connection] = {}
    prepared: list[str] = []
    gid = {n: f"{GID_PREFIX}{token}_{n}" for n in nodes}
    update = sql.SQL("ALTER EXTENSION {} UPDATE TO {}").format(sql.Identifier(EXTENSION_NAME), sql.Literal(EXTENSION_VERSION))
    try:
        order = [n for n in nodes if n != coord_name] + ([coord_name] if coord_name in nodes else [])
        for name in order:
            conn = connect(targets[name], "upgrade")
            conns[name] = conn
            conn.execute(update)
            if name == coord_name:
                # the decision commits with the coordinator's own upgrade, and only with it
                conn.execute("INSERT INTO buildsmart.twophase_decisions (token, purpose) VALUES (%s, 'upgrade')", (token,))
            report(f"{name}: {EXTENSION_NAME} updated to {EXTENSION_VERSION} (not yet committed)")
        for name in order:
            conns[name].execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid[name])))
            prepared.append(name)
            _fault_point("upgrade:prepared-" + name)
        if coord_name not in nodes:
            # the coordinator is already current: the decision is a row of its own
            with connect(targets[coord_name], "upgrade:decide", autocommit=True) as c:
                c.execute("INSERT INTO buildsmart.twophase_decisions (token, purpose) VALUES (%s, 'upgrade')", (token,))
    except BaseException as exc:
        for name in prepared:
            with connect(targets[name], "upgrade", autocommit=True) as c:
                c.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid[name])))
        for conn in conns.values():
            conn.close()
        if isinstance(exc, psycopg.Error):
            raise NodeError(f"the upgrade failed and was rolled back on every node: {exc}") from exc
        raise
    for conn in conns.values():
        conn.close()
    # commit: the coordinator first (the decision), then the others; a crash here is settled by rerun
    commit_order = ([coord_name] if coord_name in nodes else []) + [n for n in nodes if n != coord_name]
    for name in commit_order:
        with connect(targets[name], "upgrade", autocommit=True) as c:
            c.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid[name])))
        _fault_point("upgrade:committed-" + name)
    with connect(targets[coord_name], "upgrade", autocommit=True) as c:
        c.execute("DELETE FROM buildsmart.twophase_decisions WHERE token = %s", (token,))
    report(f"{len(nodes)} node(s) now run {EXTENSION_NAME} {EXTENSION_VERSION}")

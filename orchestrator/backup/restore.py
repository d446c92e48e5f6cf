"""Restore a cluster restore point into a complete new local cluster (``backup restore``).

Why in three phases: a restored server holds the original cluster's addresses (foreign servers,
subscriptions of moves in progress, Patroni's cached configuration), passwords and archive
settings. Started as is, it could reach the original cluster or archive into its repository.

1. **Files.** Per node group, Barman recovers the newest base backup that ended before the
   group's restore point LSN into the first member's directory, with ``recovery_target_name`` =
   the point. Before anything starts, the configuration is replaced: new port, the local runtime's
   settings, no archive destination (the new members' archive.conf does not exist), and Patroni's
   cached dynamic configuration of the original is deleted.
2. **Sealed start.** Each server starts with no TCP listener (a Unix socket in a private 0700
   directory, trust for the superuser only there), and ``max_logical_replication_workers = 0``
   (a subscription cannot connect anywhere). It replays WAL to the point and is promoted. Then,
   over that socket: new passwords for the superuser and application roles, subscriptions
   disabled, detached from their slots and dropped, leftover logical slots dropped, and on the
   coordinator the foreign servers, user mappings and ``buildsmart.nodes`` point at the new ports,
   and the background balancer is paused (the layout stays the point's until it is resumed).
   Recovery settings are removed and the server is stopped cleanly.
3. **Start as a cluster.** The new directory gets its own topology, credentials and (for Patroni
   groups) ``ha.json`` with a new cluster name (Patroni namespace), etcd and REST ports;
   ``cluster.up`` starts it like any stopped cluster: Patroni takes the restored data directory
   over as the leader and clones the replicas from it. Moves and splits that were open at the point
   are rolled back (before their switch) or finished (after it) with the elastic code.

The original cluster and its repository are only read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator import catalog, cluster, pgbin, roles, topology
from orchestrator.backup import archive, barman, decide, ops, repo
from orchestrator.backup.decide import RestorePoint
from orchestrator.connections import TLS_OPTIONS, tls_params
from orchestrator.elastic import jobs, move, split
from orchestrator.elastic.context import open_cluster
from orchestrator.exceptions import ClusterStateError, ConfigError, NodeError
from orchestrator.osuser import ServiceUser, run_as, service_user
from orchestrator.planner import NodeSpec
from orchestrator.runtime import ha, hasettings, local, tls
from orchestrator.runtime.ports import free_port
from orchestrator.topology import COORDINATOR, Credentials, Group, Layout, Member, Topology

log = logging.getLogger(__name__)
Report = Callable[[str], None]
RECOVERY_TIMEOUT_S = 1800.0
RECOVERY_KEYS = ("restore_command", "recovery_end_command", "recovery_target", "recovery_target_name",
                 "recovery_target_action", "recovery_target_timeline", "recovery_target_time",
                 "recovery_target_lsn", "recovery_target_xid", "recovery_target_inclusive")  # fmt: skip


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class RestoreResult:
    directory: Path
    point: RestorePoint
    topology: Topology
    seconds: float
    jobs_closed: tuple[str, ...]


def new_topology(point: RestorePoint, user: ServiceUser, replicas: int | None) -> Topology:
    """The restored cluster's groups: the point's names and roles, new free ports."""
    used: set[int] = set()
    groups = []
    order = sorted(point.groups.items(), key=lambda kv: (kv[1]["role"] != COORDINATOR, kv[0]))
    for gname, info in order:
        count = (replicas + 1) if replicas is not None else int(info["members"])
        members = []
        for i in range(count):
            port = free_port(exclude=frozenset(used))
            used.add(port)
            members.append(Member(f"{gname}-{i}", "127.0.0.1", port, data_dir=f"{gname}-{i}"))
        groups.append(Group(gname, str(info["role"]), tuple(members), dbname=str(info.get("dbname", "buildsmart"))))
    name = f"{point.cluster_name}-{point.name}"[:60]
    return Topology(name, tuple(groups), Layout((), point.time_interval), user.name)


def _write_sealed_config(
    data: Path, port: int, socket_dir: Path, superuser: str, user: ServiceUser, material: tls.Material | None
) -> None:
    settings = dict(local.SERVER_SETTINGS, **archive.ARCHIVE_SETTINGS, **local.tls_settings(material), port=str(port))
    (data / "postgresql.buildsmart.conf").write_text(
        "# written by buildsmart (restore)\n" + "\n".join(f"{k} = {v}" for k, v in sorted(settings.items())) + "\n"
    )
    (data / "postgresql.conf").write_text(
        "# written by buildsmart restore: the restored server's settings, none of the original's\n"
        "include 'postgresql.buildsmart.conf'\n"
        "include_if_exists 'postgresql.restore.conf'\n"
    )
    (data / "postgresql.restore.conf").write_text(
        "# sealed first start (removed before the cluster starts): no TCP, no logical replication workers\n"
        "listen_addresses = ''\n"
        f"unix_socket_directories = '{socket_dir}'\n"
        "max_logical_replication_workers = 0\n"
    )
    (data / "pg_hba.conf").write_text(f"# sealed first start of a restore\nlocal all {superuser} trust\n")
    for leftover in ("standby.signal", "patroni.dynamic.json", "postgresql.base.conf", "postmaster.pid"):
        (data / leftover).unlink(missing_ok=True)
    user.chown(data)
    os.chmod(data, 0o700)


def _unseal_config(data: Path, user: ServiceUser, use_tls: bool) -> None:
    (data / "postgresql.restore.conf").unlink(missing_ok=True)
    (data / "pg_hba.conf").write_text("\n".join(local.hba_rules(use_tls=use_tls)) + "\n")
    auto = data / "postgresql.auto.conf"
    if auto.exists():
        kept = [ln for ln in auto.read_text().splitlines() if ln.split("=", 1)[0].strip() not in RECOVERY_KEYS]
        auto.write_text("\n".join(kept) + "\n")
    for leftover in ("barman_wal", "recovery.signal"):
        path = data / leftover
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    user.chown(data)


def _log_tail(lm: local.LocalMember, lines: int = 6) -> str:
    text = lm.log_file.read_text(errors="replace").splitlines()[-lines:] if lm.log_file.exists() else []
    return "\n  " + "\n  ".join(text) + f"\n(see {lm.log_file})"


def _sealed_conn(socket_dir: Path, port: int, superuser: str, dbname: str) -> psycopg.Connection:
    return psycopg.connect(
        host=str(socket_dir), port=port, user=superuser, dbname=dbname, autocommit=True,
        application_name="buildsmart:restore", connect_timeout=10,
    )  # fmt: skip


def _wait_promoted(lm: local.LocalMember, socket_dir: Path, superuser: str, dbname: str) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if local.pid_of(lm.data_dir) is None:
            raise NodeError(f"restored {lm.name} stopped during recovery: {_log_tail(lm)}")
        try:
            with _sealed_conn(socket_dir, lm.member.port, superuser, dbname) as conn:
                row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    raise NodeError(f"restored {lm.name} did not finish recovery in {RECOVERY_TIMEOUT_S:.0f} s; see {lm.log_file}")


def _rewrite_node(conn: psycopg.Connection, group: Group, topo: Topology, creds: Credentials, point_name: str) -> list[str]:
    """Inside the sealed start: everything that points at the original cluster."""
    done = []
    roles.set_superuser_password(conn, creds.superuser, creds.superuser_password)
    roles.ensure_roles(conn, roles.kind_of(group.role), creds, group.dbname)
    done.append(f"{group.name}: new passwords for {creds.superuser} and {creds.app_user}")
    subs = conn.execute(
        "SELECT s.subname FROM pg_catalog.pg_subscription s JOIN pg_catalog.pg_database d ON d.oid = s.subdbid "
        "WHERE d.datname = current_database()"
    ).fetchall()
    for (name,) in subs:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
        done.append(f"{group.name}: dropped subscription {name} (it pointed at the original cluster)")
    for (slot,) in conn.execute("SELECT slot_name FROM pg_catalog.pg_replication_slots").fetchall():
        conn.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot,))
        done.append(f"{group.name}: dropped replication slot {slot}")
    if group.role == COORDINATOR:
        for worker in topo.workers:
            spec = NodeSpec(worker.name, worker.role, worker.hosts, worker.ports, worker.dbname)
            server = sql.Identifier(spec.server_name)
            exists = conn.execute("SELECT 1 FROM pg_catalog.pg_foreign_server WHERE srvname = %s", (spec.server_name,)).fetchone()
            if exists:
                conn.execute(
                    sql.SQL("ALTER SERVER {} OPTIONS (SET host {}, SET port {})").format(
                        server, sql.Literal(worker.hosts), sql.Literal(worker.ports)
                    )
                )
                _set_tls_options(conn, spec.server_name, creds.ca_file)
                # the user mapping is made again by setup when `up` starts the cluster (new passfile)
                conn.execute(sql.SQL("DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER {}").format(server))
            conn.execute(
                "UPDATE buildsmart.nodes SET hosts = %s, ports = %s WHERE name = %s", (worker.hosts, worker.ports, worker.name)
            )
        conn.execute(
            "UPDATE buildsmart.nodes SET hosts = %s, ports = %s WHERE name = %s",
            (topo.coordinator.hosts, topo.coordinator.ports, topo.coordinator.name),
        )
        done.append(f"{group.name}: foreign servers, user mappings and buildsmart.nodes point at the new cluster")
        if conn.execute("SELECT pg_catalog.to_regclass('buildsmart.balancer')").fetchone() != (None,):
            # the restored layout is the point's: the background balancer waits until told to go on
            catalog.set_paused(conn, True, f"restored from point {point_name}: `buildsmart balancer resume` to rebalance")
            done.append(f"{group.name}: background balancer paused")
    return done


def _recover_group(
    r: repo.Repository, point: RestorePoint, backups: list[decide.BaseBackup], group: Group, lm: local.LocalMember,
    user: ServiceUser,
) -> str:  # fmt: skip
    chosen = decide.backup_for_point(backups, group.name, point.lsns[group.name])
    base = lm.data_dir.parent
    base.mkdir(parents=True, exist_ok=True)
    user.chown(base)
    barman.recover(r, user, group.name, chosen.backup_id, lm.data_dir, point.wal_name or point.name)
    archive.write_script(base, user.uid, user.gid)
    return chosen.backup_id


def restore(
    r: repo.Repository,
    point: RestorePoint,
    new_dir: Path,
    replicas: int | None = None,
    report: Report = _quiet,
) -> RestoreResult:
    """Build, start and check a new local cluster in ``new_dir`` at ``point``."""
    new_dir = new_dir.resolve()
    if topology.exists(new_dir) or (new_dir / "nodes").exists():
        raise ConfigError(f"{new_dir} already holds a cluster (or a failed restore): restore into a new directory")
    try:
        return _restore(r, point, new_dir, replicas, report)
    except (ConfigError, NodeError, ClusterStateError) as exc:
        raise type(exc)(
            f"{exc}\nrestore of {point.name} into {new_dir} did not finish; the original cluster and repository were "
            f"only read. Remove it (`buildsmart down --purge --dir {new_dir}`, or delete the directory) and rerun"
        ) from exc


def _set_tls_options(conn: psycopg.Connection, server_name: str, ca_file: str | None) -> None:
    """The foreign server verifies workers against the restored cluster's CA (the original's
    options named the original's CA), or speaks plain when the restored cluster has no TLS."""
    row = conn.execute("SELECT srvoptions FROM pg_catalog.pg_foreign_server WHERE srvname = %s", (server_name,)).fetchone()
    present = {o.split("=", 1)[0] for o in (row[0] if row and row[0] else [])}
    want = tls_params(ca_file)
    changes = [
        sql.SQL("{} {} {}").format(sql.SQL("SET" if k in present else "ADD"), sql.Identifier(k), sql.Literal(v))
        for k, v in want.items()
    ]
    changes += [sql.SQL("DROP {}").format(sql.Identifier(k)) for k in sorted(TLS_OPTIONS & present - set(want))]
    if changes:
        conn.execute(sql.SQL("ALTER SERVER {} OPTIONS ({})").format(sql.Identifier(server_name), sql.SQL(", ").join(changes)))


def _restore(r: repo.Repository, point: RestorePoint, new_dir: Path, replicas: int | None, report: Report) -> RestoreResult:
    started = time.monotonic()
    missing = sorted(set(point.lsns) - set(r.groups()))
    if missing:
        raise ClusterStateError(f"the repository {r.root} has no backups of {', '.join(missing)}")
    user = service_user()
    topo = new_topology(point, user, replicas)
    roles = point.roles or {"superuser": "buildsmart_admin", "app_user": "buildsmart_app"}
    new_dir.mkdir(parents=True, exist_ok=True)
    backups = ops.all_backups(r)
    barman.cron(r, user)  # WAL still in incoming/ (the point's segment) is filed before recovery
    root = cluster.data_root(new_dir, user)
    user.chown(root)
    # the restored cluster gets its own CA when the server build has TLS (as `up` does)
    material = tls.ensure_local(root / "tls", topo.cluster_name, user) if pgbin.has_ssl() else None
    creds = replace(Credentials.generate(roles["superuser"], roles["app_user"]), ca_file=str(material.ca) if material else None)
    firsts = [(g, lm) for g, lm in cluster.local_members(new_dir, topo, user) if lm.member == g.members[0]]
    socket_dir = Path(tempfile.mkdtemp(prefix="bsr-", dir="/tmp"))
    os.chmod(socket_dir, 0o700)
    if not user.is_current:
        os.chown(socket_dir, user.uid, user.gid)
    lines: list[str] = []
    try:
        for i, (group, lm) in enumerate(firsts, 1):
            report(f"[{i}/{len(firsts)}] {group.name}: restoring base backup ...")
            backup_id = _recover_group(r, point, backups, group, lm, user)
            _write_sealed_config(lm.data_dir, lm.member.port, socket_dir, creds.superuser, user, material)
            report(f"[{i}/{len(firsts)}] {group.name}: base backup {backup_id} restored; replaying WAL to {point.name}")
        for _group, lm in firsts:
            try:
                run_as(user, [pgbin.tool("pg_ctl"), "-D", str(lm.data_dir), "-l", str(lm.log_file), "-w", "-t", "600", "start"])
            except NodeError as exc:
                raise NodeError(f"restored {lm.name} did not start: {_log_tail(lm)}") from exc
        for group, lm in firsts:
            _wait_promoted(lm, socket_dir, creds.superuser, group.dbname)
            with _sealed_conn(socket_dir, lm.member.port, creds.superuser, group.dbname) as conn:
                lines += _rewrite_node(conn, group, topo, creds, point.name)
            report(f"{group.name}: at restore point {point.name}, rewritten for the new cluster")
    finally:
        for _group, lm in firsts:
            if local.pid_of(lm.data_dir) is not None:
                run_as(user, [pgbin.tool("pg_ctl"), "-D", str(lm.data_dir), "-m", "fast", "-w", "-t", "120", "stop"])
        shutil.rmtree(socket_dir, ignore_errors=True)
    for line in lines:
        log.info("restore: %s", line)
    for _group, lm in firsts:
        _unseal_config(lm.data_dir, user, material is not None)
    member_counts = {len(g.members) for g in topo.groups}
    topo = replace(topo, runtime="patroni" if max(member_counts) > 1 else "plain")
    topology.save_credentials(new_dir, creds)
    topology.save(new_dir, topo)
    if max(member_counts) > 1:
        tls_dir = str(material.ca.parent) if material else None
        hasettings.save(new_dir, replace(ha.new_settings(topo, max(member_counts) - 1, "on"), tls_dir=tls_dir))
    report(f"starting the restored cluster in {new_dir} ...")
    cluster.up(new_dir, report=report)
    closed = _close_open_jobs(new_dir, point)
    seconds = time.monotonic() - started
    log.info("restored point %s into %s in %.1f s", point.name, new_dir, seconds)
    return RestoreResult(new_dir, point, topology.load(new_dir), seconds, tuple(closed))


def _close_open_jobs(new_dir: Path, point: RestorePoint) -> list[str]:
    """Moves and splits open at the point: before their switch they are rolled back (their
    subscriptions are gone), after it their cleanup is finished; parent jobs are cancelled."""
    out = []
    with open_cluster(new_dir, "restore") as el:
        for job in jobs.open_jobs(el.coord):
            claimed = jobs.claim(el.coord, job.job_id)
            why = f"restored to point {point.name}"
            if job.kind == "move":
                fid, source, target = int(job.args["fragment_id"]), str(job.args["source"]), str(job.args["target"])
                if claimed.step == "switched":
                    move.run_move_job(el, claimed)
                    out.append(f"job {job.job_id} (move of fragment {fid}): switched at the point; cleanup finished")
                else:
                    jobs.abandon(el.coord, job.job_id, why, partial(move.rollback, el, fid, source, target))
                    out.append(f"job {job.job_id} (move of fragment {fid}): not switched at the point; rolled back")
            elif job.kind == "split":
                fid, new_id, node = int(job.args["fragment_id"]), int(job.args["new_fragment_id"]), str(job.args["node"])
                if claimed.step == "switched":
                    split.run_split_job(el, claimed)
                    out.append(f"job {job.job_id} (split of fragment {fid}): switched at the point; cleanup finished")
                else:
                    jobs.abandon(el.coord, job.job_id, why, partial(split._rollback, el, fid, new_id, node, job.job_id))
                    out.append(f"job {job.job_id} (split of fragment {fid}): not switched at the point; rolled back")
            else:
                jobs.finish(el.coord, job.job_id, "cancelled", why)
                out.append(f"job {job.job_id} ({job.kind}): cancelled")
    for line in out:
        log.info("restore: %s", line)
    return out

"""Backup operations of a running cluster: set up the repository, take base backups, apply
retention, list, and the backup status for ``status``.

Why every command first refreshes the configuration (``ensure_configured``): a node added since
the last backup needs its Barman section and its members' archive.conf, and nothing else runs
between commands (no daemon of ours files WAL or prunes on a schedule yet; a periodic task of the
task runner can call :func:`maintain`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from orchestrator import cluster, topology
from orchestrator.backup import archive, barman, decide, points, repo
from orchestrator.backup.decide import ArchiverState, BackupStatus, BaseBackup, RestorePoint
from orchestrator.connections import Target, connect
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.topology import Credentials, Topology

log = logging.getLogger(__name__)
Report = Callable[[str], None]
CREATE_PARALLEL = 4


def _quiet(_: str) -> None:
    return None


def _member_targets(topo: Topology, creds: Credentials) -> list[tuple[str, Target]]:
    """One target per member (not per group): archiving runs on every member."""
    return [
        (m.name, Target(g.name, m.host, str(m.port), g.dbname, creds.superuser, creds.superuser_password))
        for g in topo.groups
        for m in g.members
    ]


def _archive_modes(topo: Topology, creds: Credentials) -> dict[str, str]:
    """archive_mode of every member that answers (one restarting after a switchover may not:
    it archives again once up, and `backup status` reports a member whose archiving fails)."""
    out = {}
    for name, target in _member_targets(topo, creds):
        try:
            with connect(target, "backup:check", autocommit=True, primary=False) as conn:
                row = conn.execute("SELECT current_setting('archive_mode')").fetchone()
                out[name] = str(row[0]) if row else "?"
        except NodeError as exc:
            log.info("archive_mode of %s not checked: %s", name, exc)
    return out


def configure(directory: Path, settings: repo.BackupSettings, report: Report = _quiet) -> repo.BackupSettings:
    """Write Barman's config and point every local member's archiving at the repository."""
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    user = service_user(topo.service_user)
    r = settings.repo
    repo.claim(r, directory)
    barman.write_config(r, topo.groups, creds, user)
    changed = 0
    for group, lm in cluster.local_members(directory, topo, user):
        base = lm.data_dir.parent
        archive.write_script(base, user.uid, user.gid)
        if archive.write_conf(base, r.incoming(group.name), r.spool(group.name), user.uid, user.gid):
            changed += 1
            log.info("archiving of %s now goes to %s", lm.name, r.incoming(group.name))
    off = {m: mode for m, mode in _archive_modes(topo, creds).items() if mode not in ("always", "on")}
    if off:
        raise ClusterStateError(
            "archive_mode is not on for "
            + ", ".join(f"{m} ({mode})" for m, mode in sorted(off.items()))
            + ": the repository is configured; restart the cluster (`buildsmart down` then `buildsmart up`) and rerun"
        )
    if changed:
        report(f"WAL archiving of {changed} member(s) now goes to {r.root}")
    return settings


def init(
    directory: Path,
    repository: Path | None = None,
    retention: repo.Retention | None = None,
    report: Report = _quiet,
    schedule: repo.Schedule | None = None,
) -> repo.BackupSettings:
    """Set (or change the retention of) the cluster's backup repository."""
    directory = directory.resolve()
    topo = topology.load(directory)
    user = service_user(topo.service_user)
    current = repo.load(directory) if repo.exists(directory) else None
    if repository is None:
        location = Path(current.repository) if current else repo.default_location(directory, user.can_traverse(directory))
    else:
        location = repository.resolve()
    if current is not None and Path(current.repository) != location:
        log.info("backup repository of %s changes from %s to %s", directory, current.repository, location)
    settings = repo.BackupSettings(
        str(location),
        retention or (current.retention if current else repo.Retention()),
        schedule or (current.schedule if current else repo.Schedule()),
    )
    configure(directory, settings, report)
    repo.save(directory, settings)
    sched = settings.schedule
    report(f"backup repository: {location} (keep {settings.retention.keep_count} base backups per node and all younger than "
           f"{settings.retention.keep_days:g} days; the task runner makes a restore point every {sched.points_every_min:g} min "
           f"and base backups every {sched.base_every_h:g} h, 0 = never)")  # fmt: skip
    return settings


def ensure_configured(directory: Path) -> tuple[repo.BackupSettings, Topology, ServiceUser]:
    directory = directory.resolve()
    settings = repo.load(directory)
    configure(directory, settings)
    topo = topology.load(directory)
    return settings, topo, service_user(topo.service_user)


def create(directory: Path, report: Report = _quiet) -> dict[str, str]:
    """A base backup of every node group, CREATE_PARALLEL at a time (most of a Barman backup is
    waiting: for the checkpoint and for its last WAL segment to be archived), then retention.
    Returns group -> backup id."""
    settings, topo, user = ensure_configured(directory)
    r = settings.repo
    barman.cron(r, user)
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    report(f"base backups of {len(topo.groups)} node groups ({', '.join(g.name for g in topo.groups)}) ...")
    with ThreadPoolExecutor(max_workers=CREATE_PARALLEL) as pool:
        futures = {g.name: pool.submit(barman.backup, r, user, g.name) for g in topo.groups}
        for name, fut in futures.items():
            try:
                done[name] = fut.result()
                report(f"[{len(done)}/{len(topo.groups)}] {name}: backup {done[name]} done")
            except NodeError as exc:
                failed[name] = str(exc)
    if failed:
        finished = ", ".join(f"{g} ({b})" for g, b in done.items()) or "none"
        raise NodeError(
            "; ".join(f"{g}: {e}" for g, e in failed.items()) + f"\nfinished: {finished}; rerun `buildsmart backup create`"
        )
    for line in apply_retention(directory, settings, user):
        report(line)
    return done


def all_backups(r: repo.Repository) -> list[BaseBackup]:
    return [b for g in r.groups() for b in barman.list_backups(r, g)]


def apply_retention(directory: Path, settings: repo.BackupSettings, user: ServiceUser, now: datetime | None = None) -> list[str]:
    """Delete the base backups retention expires (Barman drops the WAL only they needed) and
    the records of restore points no remaining backup can reach. Returns what it did."""
    r = settings.repo
    now = now or datetime.now(UTC)
    lines = []
    expired = decide.expired_backups(all_backups(r), settings.retention.keep_count, settings.retention.keep_days, now)
    for b in expired:
        barman.delete(r, user, b.group, b.backup_id)
        lines.append(f"retention: deleted base backup {b.backup_id} of {b.group}")
    remaining = all_backups(r)
    for p in points.load_points(r):
        if not decide.restorable(p, remaining) and any(
            b.done and decide.lsn_value(b.end_lsn) <= decide.lsn_value(p.lsns.get(b.group, "0/0")) for b in expired
        ):
            (r.points_dir / f"{p.name}.json").unlink(missing_ok=True)
            log.info("restore point %s dropped from %s: its base backups expired", p.name, r.root)
            lines.append(f"retention: restore point {p.name} is no longer restorable and was removed")
    return lines


def maintain(directory: Path) -> list[str]:
    """What a periodic task runs: file archived WAL and apply retention."""
    settings, _topo, user = ensure_configured(directory)
    barman.cron(settings.repo, user)
    return apply_retention(directory, settings, user)


@dataclass(frozen=True)
class Listing:
    backups: tuple[BaseBackup, ...]
    points: tuple[tuple[RestorePoint, bool], ...]  # point, restorable


def listing(directory: Path) -> Listing:
    settings, _topo, user = ensure_configured(directory)
    barman.cron(settings.repo, user)
    backups = all_backups(settings.repo)
    pts = points.load_points(settings.repo)
    return Listing(tuple(backups), tuple((p, decide.restorable(p, backups)) for p in pts))


def _archivers(topo: Topology, creds: Credentials) -> list[ArchiverState]:
    out = []
    for name, target in _member_targets(topo, creds):
        try:
            with connect(target, "backup:status", autocommit=True, primary=False) as conn:
                row = conn.execute(
                    "SELECT archived_count, failed_count, last_archived_time, last_failed_time, last_failed_wal "
                    "FROM pg_catalog.pg_stat_archiver"
                ).fetchone()
        except (NodeError, psycopg.Error) as exc:
            log.info("archiver state of %s unknown: %s", name, exc)
            continue
        if row is not None:
            out.append(ArchiverState(name, int(row[0]), int(row[1]), row[2], row[3], row[4]))
    return out


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def status(directory: Path) -> BackupStatus:
    """The frozen backup status of the cluster in ``directory`` (for `status` and metrics)."""
    directory = directory.resolve()
    topo = topology.load(directory)
    if not repo.exists(directory):
        return decide.summarize(False, None, [], [], [], [], 0, datetime.now(UTC))
    settings = repo.load(directory)
    r = settings.repo
    creds = topology.load_credentials(directory)
    return decide.summarize(
        True,
        str(r.root),
        [g.name for g in topo.groups],
        all_backups(r),
        points.load_points(r),
        _archivers(topo, creds),
        _du(r.root),
        datetime.now(UTC),
    )

"""Barman as the backup engine: one Barman "server" per node group, driven as the service user.

Why Barman: it is maintained, supports PostgreSQL 18, keeps a catalogue of base backups and WAL
per server, validates and de-duplicates archived WAL, and recovers locally with a named target;
none of that needs ssh for a local repository:

- WAL arrives through ``archiver = on`` (files put in the group's ``incoming/`` by every
  member's archive_command, see archive.py; ``barman cron`` / ``archive-wal`` files them);
- base backups use ``backup_method = postgres`` (pg_basebackup over a replication connection
  that lists every member with ``target_session_attrs=read-write``, so it follows the primary);
- ``barman recover`` without ``--remote-ssh-command`` restores into a local directory.

Every Barman call runs as the service user (``barman_user``), which owns the repository, so the
archive_command (run by PostgreSQL as that user) and Barman write the same files. Passwords stay
in the repository's passfile (0600), never in a config file or a command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from orchestrator import pgbin
from orchestrator.backup import decide
from orchestrator.backup.repo import Repository
from orchestrator.exceptions import NodeError
from orchestrator.osuser import ServiceUser, run_as
from orchestrator.topology import Credentials, Group

log = logging.getLogger(__name__)


def barman_bin() -> str:
    """The barman script of the venv the orchestrator runs in (readable by the service user)."""
    candidate = Path(sys.executable).parent / "barman"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("barman")
    if found is None:
        raise NodeError("barman is not installed (pip install barman psycopg2-binary; scripts/setup.sh does it)")
    return found


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _conninfo(group: Group, user: str, passfile: Path, replication: bool) -> str:
    parts = [
        f"host={group.hosts}",
        f"port={group.ports}",
        f"user={user}",
        f"passfile={passfile}",
        "connect_timeout=10",
        "application_name=buildsmart:barman",
    ]
    if not replication:
        parts.append(f"dbname={group.dbname}")
    if len(group.members) > 1:
        parts.append("target_session_attrs=read-write")
    return " ".join(parts)


def write_config(repo: Repository, groups: tuple[Group, ...], creds: Credentials, user: ServiceUser) -> None:
    """Barman's global config and one server section per group (groups already in the
    repository but no longer in the topology keep theirs: their backups stay restorable)."""
    for path in (repo.root, repo.barman_dir, repo.conf_d, repo.home, repo.points_dir, repo.root / "spool"):
        path.mkdir(parents=True, exist_ok=True)
    fd = os.open(repo.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"*:*:*:{_pgpass_escape(creds.superuser)}:{_pgpass_escape(creds.superuser_password)}\n")
    repo.barman_conf.write_text(
        "; written by buildsmart (orchestrator/backup/barman.py)\n"
        "[barman]\n"
        f"barman_user = {user.name}\n"
        f"barman_home = {repo.home}\n"
        f"log_file = {repo.barman_dir / 'barman.log'}\n"
        "log_level = INFO\n"
        f"configuration_files_directory = {repo.conf_d}\n"
        # retention is decided by buildsmart (count AND age, see decide.expired_backups)
        "minimum_redundancy = 0\n"
    )
    for group in groups:
        (repo.conf_d / f"{group.name}.conf").write_text(
            f"; node group {group.name}, written by buildsmart\n"
            f"[{group.name}]\n"
            f"description = BuildSmartDB node group {group.name}\n"
            f"conninfo = {_conninfo(group, creds.superuser, repo.pgpass, replication=False)}\n"
            f"streaming_conninfo = {_conninfo(group, creds.superuser, repo.pgpass, replication=True)}\n"
            "backup_method = postgres\n"
            "archiver = on\n"
            "streaming_archiver = off\n"
            "immediate_checkpoint = true\n"
            f"path_prefix = {pgbin.bin_dir()}\n"
        )
        for path in (repo.group_home(group.name), repo.incoming(group.name), repo.spool(group.name)):
            path.mkdir(parents=True, exist_ok=True)
    user.chown(repo.root)
    os.chmod(repo.root, 0o750)


def run(repo: Repository, user: ServiceUser, *args: str) -> str:
    """One Barman command as the service user; its stdout. Raises NodeError with Barman's words."""
    cmd = [barman_bin(), "-c", str(repo.barman_conf), *args]
    try:
        proc = run_as(user, cmd)
    except NodeError as exc:
        raise NodeError(f"barman {' '.join(args)}: {exc}") from exc
    return proc.stdout


def cron(repo: Repository, user: ServiceUser) -> None:
    """File the WAL waiting in every group's incoming/ into its archive, in the foreground (what
    `barman cron` starts in the background on a schedule; buildsmart runs it at every backup
    command and before a restore, which needs the files filed)."""
    for group in repo.groups():
        run(repo, user, "-q", "archive-wal", group)


def backup(repo: Repository, user: ServiceUser, group: str) -> str:
    """A base backup of the group's primary; waits until the WAL it needs is archived. Returns its id."""
    before = {b.backup_id for b in list_backups(repo, group)}
    run(repo, user, "backup", "--wait", "--wait-timeout", "300", group)
    new = [b for b in list_backups(repo, group) if b.backup_id not in before]
    if not new or new[-1].status != "DONE":
        raise NodeError(f"barman backup of {group} did not complete; see {repo.barman_dir / 'barman.log'}")
    log.info("base backup %s of %s done (%d bytes)", new[-1].backup_id, group, new[-1].size_bytes)
    return new[-1].backup_id


def _parse_info(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def list_backups(repo: Repository, group: str) -> list[decide.BaseBackup]:
    """Base backups of a group from Barman's catalogue (meta/<id>-backup.info), oldest first."""
    meta = repo.group_home(group) / "meta"
    if not meta.is_dir():
        return []
    out = []
    for info_file in sorted(meta.glob("*-backup.info")):
        info = _parse_info(info_file)
        out.append(
            decide.BaseBackup(
                group=group,
                backup_id=info_file.name.removesuffix("-backup.info"),
                status=info.get("status", "UNKNOWN"),
                begin_lsn=info.get("begin_xlog", "0/0"),
                end_lsn=info.get("end_xlog", "0/0"),
                end_time=decide.parse_time(info.get("end_time")),
                timeline=int(info.get("timeline") or 0),
                size_bytes=int(info.get("size") or 0),
            )
        )
    return sorted(out, key=lambda b: b.backup_id)


def delete(repo: Repository, user: ServiceUser, group: str, backup_id: str) -> None:
    """Delete a base backup; Barman also removes the WAL no remaining backup needs."""
    run(repo, user, "delete", group, backup_id)
    log.info("deleted base backup %s of %s (retention)", backup_id, group)


def recover(repo: Repository, user: ServiceUser, group: str, backup_id: str, dest: Path, target_name: str | None) -> None:
    """Restore a base backup into ``dest`` with the WAL to replay up to ``target_name`` (then
    promote); the server is not started."""
    args = ["recover", group, backup_id, str(dest)]
    if target_name is not None:
        # "latest": follow the timeline switches (switchover, failover) recorded in the archived
        # history files; without it Barman copies the WAL of the backup's own timeline only
        args += ["--target-name", target_name, "--target-action", "promote", "--target-tli", "latest"]
    run(repo, user, *args)
    log.info("recovered base backup %s of %s into %s (target %s)", backup_id, group, dest, target_name or "end of WAL")

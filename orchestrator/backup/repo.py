"""The backup repository and the cluster's backup settings.

A repository is a directory (local or mounted) that nothing but backups writes to:

    REPO/repository.json        format, cluster name (a repository serves one cluster)
    REPO/barman/barman.conf     Barman's global config; barman/conf.d/<group>.conf per node group
    REPO/barman/home/<group>/   Barman's store of the group: base/ (base backups), wals/, incoming/
    REPO/spool/<group>/         archive_command's temporary files (same file system as incoming/)
    REPO/points/<name>.json     cluster restore points (topology, catalog version, LSNs, checksums)
    REPO/pgpass                 the passfile Barman connects with (0600, service user)

Everything a restore needs is under ``barman/home`` and ``points``; a later object-storage backend
replaces those two (barman-cloud keeps the same per-group base/ + wals/ split) and leaves the rest.

The cluster directory keeps ``backup.json``: where the repository is and the retention settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.exceptions import ConfigError

log = logging.getLogger(__name__)

SETTINGS_FILE = "backup.json"
FORMAT = 1


@dataclass(frozen=True)
class Retention:
    """Keep at least ``keep_count`` base backups per group, and every backup younger than
    ``keep_days`` days. WAL older than the oldest kept backup goes with it (Barman)."""

    keep_count: int = 3
    keep_days: float = 7.0


@dataclass(frozen=True)
class Schedule:
    """What the task runner's "backup" task does on its own (0 turns a kind off): a cluster
    restore point every ``points_every_min`` minutes, base backups every ``base_every_h`` hours."""

    points_every_min: float = 60.0
    base_every_h: float = 24.0


@dataclass(frozen=True)
class BackupSettings:
    repository: str
    retention: Retention = Retention()
    schedule: Schedule = Schedule()

    @property
    def repo(self) -> Repository:
        return Repository(Path(self.repository))


@dataclass(frozen=True)
class Repository:
    root: Path

    @property
    def barman_dir(self) -> Path:
        return self.root / "barman"

    @property
    def barman_conf(self) -> Path:
        return self.barman_dir / "barman.conf"

    @property
    def conf_d(self) -> Path:
        return self.barman_dir / "conf.d"

    @property
    def home(self) -> Path:
        return self.barman_dir / "home"

    def group_home(self, group: str) -> Path:
        return self.home / group

    def incoming(self, group: str) -> Path:
        return self.group_home(group) / "incoming"

    def spool(self, group: str) -> Path:
        return self.root / "spool" / group

    @property
    def points_dir(self) -> Path:
        return self.root / "points"

    @property
    def pgpass(self) -> Path:
        return self.root / "pgpass"

    @property
    def marker(self) -> Path:
        return self.root / "repository.json"

    def groups(self) -> list[str]:
        """Groups with a Barman store (also groups no longer in the topology)."""
        return sorted(p.name for p in self.home.iterdir() if p.is_dir()) if self.home.is_dir() else []


def exists(directory: Path) -> bool:
    return (directory / SETTINGS_FILE).exists()


def load(directory: Path) -> BackupSettings:
    path = directory / SETTINGS_FILE
    try:
        data = json.loads(path.read_text())
        return BackupSettings(data["repository"], Retention(**data.get("retention", {})), Schedule(**data.get("schedule", {})))
    except FileNotFoundError as exc:
        raise ConfigError(f"no backup repository configured for {directory}: run `buildsmart backup init` first") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not valid backup settings: {exc}") from exc


def save(directory: Path, settings: BackupSettings) -> None:
    path = directory / SETTINGS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    os.replace(tmp, path)
    log.info("backup settings of %s: repository %s, retention %s", directory, settings.repository, settings.retention)


def default_location(directory: Path, can_traverse: bool) -> Path:
    """DIR/backups when the service user can reach DIR, else beside the member data (see
    cluster.data_root), which the service user can always reach."""
    if can_traverse:
        return directory / "backups"
    nodes = directory / "nodes"
    return nodes.resolve().parent / (nodes.resolve().name + "-backups")


def claim(repo: Repository, directory: Path) -> None:
    """Mark the repository as the cluster in ``directory``'s; refuse one that holds another
    cluster's backups (a restored cluster has the same system identifiers as its original, so
    the cluster directory is what tells them apart)."""
    if repo.marker.exists():
        try:
            owner = json.loads(repo.marker.read_text()).get("cluster_dir")
        except ValueError as exc:
            raise ConfigError(f"{repo.marker} is not valid JSON: {exc}") from exc
        if owner != str(directory):
            raise ConfigError(f"{repo.root} holds the backups of the cluster in {owner}, not {directory}: choose another --repo")
        return
    repo.root.mkdir(parents=True, exist_ok=True)
    repo.marker.write_text(json.dumps({"format": FORMAT, "cluster_dir": str(directory)}) + "\n")
    log.info("backup repository %s created for the cluster in %s", repo.root, directory)

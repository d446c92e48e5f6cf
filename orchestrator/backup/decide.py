"""Backup decisions as pure functions over frozen snapshots (unit-tested without servers):
which restore point answers ``--to TIME``, which base backup a point is restored from, what
retention deletes, and what ``status`` says about backups.

Why points and not times: each fragment commits on its own worker, so one wall-clock time is not
one state of the cluster; a restore point is made while distributed writes are held back, so the
same named point on every node is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from orchestrator.exceptions import ClusterStateError, ConfigError

PointReason = Literal["manual", "schedule", "migration", "move", "split", "rebalance", "backup"]
Sums = tuple[int, int]


def parse_time(value: str | None) -> datetime | None:
    if not value or value == "None":
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def lsn_value(lsn: str) -> int:
    """'16/B374D848' -> integer position (LSNs only grow, also across timelines)."""
    hi, _, lo = lsn.partition("/")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError as exc:
        raise ConfigError(f"not an LSN: {lsn!r}") from exc


@dataclass(frozen=True)
class BaseBackup:
    group: str
    backup_id: str
    status: str  # Barman's: DONE, FAILED, STARTED, ...
    begin_lsn: str
    end_lsn: str
    end_time: datetime | None
    timeline: int
    size_bytes: int

    @property
    def done(self) -> bool:
        return self.status == "DONE"


@dataclass(frozen=True)
class FragmentAt:
    """A fragment as the catalog placed it at a point."""

    fragment_id: int
    range_from: str | None
    range_to: str | None
    node: str
    time_interval: str
    ts_from: str | None = None  # ISO 8601: a fragment of a building split by time
    ts_to: str | None = None
    time_group: str | None = None

    @property
    def shard_name(self) -> str:
        return f"readings_f{self.fragment_id}"


@dataclass(frozen=True)
class RestorePoint:
    """A cluster-consistent restore point: the same name on every group's primary, made inside
    one distributed write pause. ``checksums``: shard -> time-partition bound -> (rows, sum),
    computed from snapshots exported in that pause."""

    name: str
    reason: str
    created_at: datetime
    catalog_version: int
    pause_ms: float
    lsns: Mapping[str, str]  # group -> LSN of its restore point record
    timelines: Mapping[str, int]
    groups: Mapping[str, Mapping[str, Any]]  # group -> {"role", "members", "dbname"}
    fragments: tuple[FragmentAt, ...]
    cluster_name: str
    time_interval: str
    checksums: Mapping[str, Mapping[str, Sums]] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)  # "superuser", "app_user": role names, no secrets
    wal_name: str = ""  # the name in the WAL (recovery_target_name): NAME@<unique suffix>

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "catalog_version": self.catalog_version,
            "pause_ms": self.pause_ms,
            "lsns": dict(self.lsns),
            "timelines": dict(self.timelines),
            "groups": {g: dict(v) for g, v in self.groups.items()},
            "fragments": [f.__dict__ for f in self.fragments],
            "cluster_name": self.cluster_name,
            "time_interval": self.time_interval,
            "checksums": {s: {b: list(v) for b, v in u.items()} for s, u in self.checksums.items()},
            "roles": dict(self.roles),
            "wal_name": self.wal_name or self.name,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RestorePoint:
        created = parse_time(data["created_at"])
        assert created is not None
        return RestorePoint(
            name=data["name"],
            reason=data.get("reason", "manual"),
            created_at=created,
            catalog_version=int(data["catalog_version"]),
            pause_ms=float(data.get("pause_ms", 0.0)),
            lsns=dict(data["lsns"]),
            timelines={k: int(v) for k, v in data.get("timelines", {}).items()},
            groups={g: dict(v) for g, v in data["groups"].items()},
            fragments=tuple(FragmentAt(**f) for f in data["fragments"]),
            cluster_name=data.get("cluster_name", "buildsmart"),
            time_interval=data.get("time_interval", "1 month"),
            checksums={s: {b: (int(v[0]), int(v[1])) for b, v in u.items()} for s, u in data.get("checksums", {}).items()},
            roles=dict(data.get("roles", {})),
            wal_name=data.get("wal_name") or data["name"],
        )


def point_for_time(points: Iterable[RestorePoint], when: datetime) -> RestorePoint:
    """The latest cluster restore point made at or before ``when``."""
    earlier = [p for p in points if p.created_at <= when]
    if not earlier:
        raise ClusterStateError(f"no cluster restore point at or before {when.isoformat()}: `buildsmart backup list` shows them")
    return max(earlier, key=lambda p: (p.created_at, p.name))


def backup_for_point(backups: Sequence[BaseBackup], group: str, lsn: str) -> BaseBackup:
    """The newest finished base backup of ``group`` that ended at or before ``lsn`` (recovery
    replays from it to the point; a backup ending after the point cannot stop there)."""
    target = lsn_value(lsn)
    usable = [b for b in backups if b.group == group and b.done and lsn_value(b.end_lsn) <= target]
    if not usable:
        raise ClusterStateError(
            f"node group {group} has no base backup that ended before its restore point (LSN {lsn}): "
            "a point is restorable only after a `buildsmart backup create` that precedes it"
        )
    return max(usable, key=lambda b: lsn_value(b.end_lsn))


def restorable(point: RestorePoint, backups: Sequence[BaseBackup]) -> bool:
    try:
        for group, lsn in point.lsns.items():
            backup_for_point(backups, group, lsn)
    except ClusterStateError:
        return False
    return True


def latest_restorable(points: Iterable[RestorePoint], backups: Sequence[BaseBackup]) -> RestorePoint | None:
    usable = [p for p in points if restorable(p, backups)]
    return max(usable, key=lambda p: p.created_at) if usable else None


def expired_backups(backups: Sequence[BaseBackup], keep_count: int, keep_days: float, now: datetime) -> list[BaseBackup]:
    """Per group, a finished backup is kept while it is among the ``keep_count`` newest finished
    ones OR younger than ``keep_days``; the others expire. Failed backups expire once a newer
    backup finished. Keeping by count AND age: a burst of backups never pushes out last week's,
    and a quiet week never deletes the last good ones."""
    if keep_count < 1:
        raise ConfigError("retention must keep at least one base backup per node group")
    expired: list[BaseBackup] = []
    for group in sorted({b.group for b in backups}):
        mine = sorted((b for b in backups if b.group == group), key=lambda b: b.backup_id, reverse=True)
        done = [b for b in mine if b.done]
        keep = {b.backup_id for b in done[:keep_count]}
        keep |= {b.backup_id for b in done if b.end_time is not None and now - b.end_time < timedelta(days=keep_days)}
        newest_done = done[0].backup_id if done else None
        for b in mine:
            superseded_failure = not b.done and newest_done is not None and b.backup_id < newest_done
            if (b.done and b.backup_id not in keep) or superseded_failure:
                expired.append(b)
    return expired


@dataclass(frozen=True)
class ScheduledWork:
    base_backups: bool
    point: bool
    why: str


def scheduled_work(
    groups: Sequence[str],
    backups: Sequence[BaseBackup],
    points: Sequence[RestorePoint],
    points_every_min: float,
    base_every_h: float,
    now: datetime,
) -> ScheduledWork:
    """What the periodic backup task does now: base backups when a group's newest good one is
    older than ``base_every_h`` (or missing), a restore point when the newest is older than
    ``points_every_min`` and every group has a base backup (a point before any is not restorable)."""
    newest: dict[str, datetime] = {}
    for b in backups:
        if b.done and b.end_time is not None and (b.group not in newest or b.end_time > newest[b.group]):
            newest[b.group] = b.end_time
    stale = [g for g in groups if g not in newest or now - newest[g] >= timedelta(hours=base_every_h)]
    base = base_every_h > 0 and bool(stale)
    covered = all(g in newest for g in groups)
    last = max((p.created_at for p in points), default=None)
    point_due = points_every_min > 0 and (last is None or now - last >= timedelta(minutes=points_every_min))
    point = point_due and (covered or base)
    why = []
    if base:
        why.append(f"base backups ({', '.join(stale)} {'have none' if not covered else 'are due'})")
    if point:
        why.append("a restore point (" + ("none yet" if last is None else f"last {now - last} ago") + ")")
    return ScheduledWork(base, point, "; ".join(why) or "nothing due")


@dataclass(frozen=True)
class ArchiverState:
    """One member's pg_stat_archiver row (None values: never)."""

    member: str
    archived_count: int
    failed_count: int
    last_archived_time: datetime | None
    last_failed_time: datetime | None
    last_failed_wal: str | None

    @property
    def failing(self) -> bool:
        """The last attempt failed (a failure followed by a success is history, not a problem)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


@dataclass(frozen=True)
class BackupStatus:
    """What `status` (and later metrics) shows about backups; frozen, cheap to build."""

    configured: bool
    repository: str | None = None
    space_used_bytes: int = 0
    last_good_backup_age_s: float | None = None  # of the cluster: the oldest of each group's newest good backup
    groups_without_backup: tuple[str, ...] = ()
    last_point: str | None = None
    last_point_age_s: float | None = None
    failing_archivers: tuple[ArchiverState, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.configured and not self.problems


def summarize(
    configured: bool,
    repository: str | None,
    groups: Sequence[str],
    backups: Sequence[BaseBackup],
    points: Sequence[RestorePoint],
    archivers: Sequence[ArchiverState],
    space_used_bytes: int,
    now: datetime,
    max_backup_age: timedelta = timedelta(days=2),
) -> BackupStatus:
    """The backup status of a cluster from what was read; problems are the sentences to shout."""
    if not configured:
        return BackupStatus(configured=False, problems=("no backup repository: run `buildsmart backup init`",))
    newest: dict[str, datetime] = {}
    for b in backups:
        if b.done and b.end_time is not None and (b.group not in newest or b.end_time > newest[b.group]):
            newest[b.group] = b.end_time
    missing = tuple(g for g in groups if g not in newest)
    age = None if missing or not newest else (now - min(newest[g] for g in groups)).total_seconds()
    failing = tuple(a for a in archivers if a.failing)
    problems = [
        f"WAL ARCHIVING FAILS on {a.member}: {a.failed_count} failure(s), last {a.last_failed_wal} at "
        f"{a.last_failed_time:%Y-%m-%d %H:%M:%S} UTC; WAL accumulates on that server and restores stop before it"
        for a in failing
        if a.last_failed_time is not None
    ]
    if missing:
        problems.append(f"no base backup of {', '.join(missing)}: run `buildsmart backup create`")
    elif age is not None and age > max_backup_age.total_seconds():
        problems.append(f"the last good base backup is {age / 3600:.1f} h old")
    last = max(points, key=lambda p: p.created_at) if points else None
    return BackupStatus(
        configured=True,
        repository=repository,
        space_used_bytes=space_used_bytes,
        last_good_backup_age_s=age,
        groups_without_backup=missing,
        last_point=last.name if last else None,
        last_point_age_s=(now - last.created_at).total_seconds() if last else None,
        failing_archivers=failing,
        problems=tuple(problems),
    )

"""Backup decisions without servers: which point answers --to TIME, which base backup a point is
restored from, what retention deletes, what status reports, the archive script's behaviour."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.backup import archive, decide
from orchestrator.backup.decide import ArchiverState, BaseBackup, FragmentAt, RestorePoint
from orchestrator.exceptions import ClusterStateError, ConfigError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _point(name: str, at: datetime, lsns: dict[str, str] | None = None) -> RestorePoint:
    return RestorePoint(
        name=name, reason="manual", created_at=at, catalog_version=3, pause_ms=4.2,
        lsns=lsns or {"coordinator": "0/5000000", "w1": "0/7000000"}, timelines={"coordinator": 1, "w1": 2},
        groups={"coordinator": {"role": "coordinator", "members": 2, "dbname": "buildsmart"},
                "w1": {"role": "worker", "members": 2, "dbname": "buildsmart"}},
        fragments=(FragmentAt(1, None, "b3", "w1", "1 month"),), cluster_name="buildsmart", time_interval="1 month",
        checksums={"readings_f1": {"DEFAULT": (3, -12345678901234)}}, roles={"superuser": "a", "app_user": "b"},
        wal_name=f"{name}@0123abcd",
    )  # fmt: skip


def _backup(group: str, bid: str, end_lsn: str, end: datetime | None, status: str = "DONE") -> BaseBackup:
    return BaseBackup(group, bid, status, "0/1000000", end_lsn, end, 1, 1000)


def test_point_for_time_takes_the_latest_point_at_or_before() -> None:
    pts = [_point("p1", T0), _point("p2", T0 + timedelta(hours=1)), _point("p3", T0 + timedelta(hours=2))]
    assert decide.point_for_time(pts, T0 + timedelta(minutes=90)).name == "p2"
    assert decide.point_for_time(pts, T0 + timedelta(hours=1)).name == "p2"  # at: inclusive
    assert decide.point_for_time(pts, T0 + timedelta(days=9)).name == "p3"
    with pytest.raises(ClusterStateError, match="no cluster restore point at or before"):
        decide.point_for_time(pts, T0 - timedelta(seconds=1))


def test_backup_for_point_is_the_newest_that_ended_before_the_point() -> None:
    backups = [
        _backup("w1", "20260301T100000", "0/3000000", T0),
        _backup("w1", "20260301T110000", "0/6000000", T0),
        _backup("w1", "20260301T113000", "0/6800000", T0, status="FAILED"),
        _backup("w1", "20260301T120000", "0/9000000", T0),  # after the point: cannot stop there
        _backup("coordinator", "20260301T100001", "0/4000000", T0),
    ]
    assert decide.backup_for_point(backups, "w1", "0/7000000").backup_id == "20260301T110000"
    assert decide.backup_for_point(backups, "w1", "0/6000000").backup_id == "20260301T110000"  # ends exactly there
    with pytest.raises(ClusterStateError, match="no base backup"):
        decide.backup_for_point(backups, "w1", "0/2000000")
    assert decide.restorable(_point("p", T0), backups)
    late = _point("late", T0 + timedelta(hours=1), {"coordinator": "0/5000000", "w1": "0/1000000"})  # before any w1 backup
    assert decide.latest_restorable([_point("p", T0), late], backups) == _point("p", T0)
    assert not decide.restorable(_point("p", T0, {"coordinator": "0/5000000", "w2": "0/7000000"}), backups)


def test_lsn_order_is_numeric_not_textual() -> None:
    assert decide.lsn_value("A/0") > decide.lsn_value("9/FFFFFFFF")
    assert decide.lsn_value("0/10") > decide.lsn_value("0/F")
    with pytest.raises(ConfigError):
        decide.lsn_value("nonsense")


def test_retention_keeps_by_count_and_by_age() -> None:
    now = T0
    old = [_backup("w1", f"2026020{i}T000000", f"0/{i}000000", now - timedelta(days=30 - i)) for i in range(1, 6)]
    young = [_backup("w1", "20260228T000000", "0/A000000", now - timedelta(days=1))]
    failed_old = [_backup("w1", "20260201T120000", "0/0", None, status="FAILED")]
    failed_new = [_backup("w1", "20260301T000000", "0/0", None, status="FAILED")]
    expired = decide.expired_backups(old + young + failed_old + failed_new, keep_count=2, keep_days=7, now=now)
    ids = {b.backup_id for b in expired}
    # the 2 newest good ones (young + the newest old) stay; 4 older good ones go; a failed backup
    # goes once a newer one finished, the newest failure stays (it may be being looked at)
    assert ids == {"20260201T000000", "20260202T000000", "20260203T000000", "20260204T000000", "20260201T120000"}
    # by age: everything younger than 40 days is kept whatever the count
    assert decide.expired_backups(old + young, keep_count=1, keep_days=40, now=now) == []
    # other groups are decided on their own
    other = [_backup("w2", "20260101T000000", "0/1", now - timedelta(days=60))]
    assert decide.expired_backups(old + other, keep_count=1, keep_days=7, now=now)[-1].group == "w1"
    with pytest.raises(ConfigError):
        decide.expired_backups(old, keep_count=0, keep_days=1, now=now)


def test_status_reports_a_failing_archiver_loudly() -> None:
    backups = [_backup("coordinator", "a", "0/1", T0 - timedelta(hours=3)), _backup("w1", "b", "0/1", T0 - timedelta(hours=1))]
    healthy = ArchiverState("w1-0", 10, 2, T0, T0 - timedelta(hours=1), "000000010000000000000003")
    failing = ArchiverState("w1-1", 10, 5, T0 - timedelta(hours=1), T0 - timedelta(minutes=1), "000000010000000000000009")
    st = decide.summarize(True, "/r", ["coordinator", "w1"], backups, [_point("p", T0)], [healthy, failing], 99, T0)
    assert not healthy.failing and failing.failing
    assert st.failing_archivers == (failing,)
    assert not st.ok
    assert any("WAL ARCHIVING FAILS on w1-1" in p for p in st.problems)
    assert st.last_good_backup_age_s == pytest.approx(3 * 3600)  # the cluster is as old as its oldest group's newest
    assert st.last_point == "p"
    ok = decide.summarize(True, "/r", ["coordinator", "w1"], backups, [], [healthy], 99, T0)
    assert ok.ok and ok.problems == ()
    missing = decide.summarize(True, "/r", ["coordinator", "w1", "w2"], backups, [], [], 0, T0)
    assert missing.groups_without_backup == ("w2",) and missing.last_good_backup_age_s is None
    assert not decide.summarize(False, None, [], [], [], [], 0, T0).ok


def test_point_record_round_trips() -> None:
    p = _point("p1", T0)
    assert RestorePoint.from_json(p.to_json()) == p


def _run_script(base: Path, wal: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(base / archive.SCRIPT), str(wal), wal.name], capture_output=True, text=True, check=False)


def test_archive_script_copies_once_accepts_the_same_bytes_and_refuses_other_bytes(tmp_path: Path) -> None:
    base, incoming, spool = tmp_path / "member", tmp_path / "incoming", tmp_path / "spool"
    for d in (incoming, spool):
        d.mkdir()
    archive.write_script(base)
    wal = tmp_path / "000000010000000000000001"
    wal.write_bytes(b"x" * 1000)
    # no archive.conf: acknowledged, not kept (no repository configured)
    assert _run_script(base, wal).returncode == 0
    assert list(incoming.iterdir()) == []
    assert archive.write_conf(base, incoming, spool)
    assert not archive.write_conf(base, incoming, spool)  # unchanged
    assert _run_script(base, wal).returncode == 0
    assert (incoming / wal.name).read_bytes() == wal.read_bytes()
    assert list(spool.iterdir()) == []
    assert _run_script(base, wal).returncode == 0  # the other member of the group archives it again
    wal.write_bytes(b"y" * 1000)
    failed = _run_script(base, wal)
    assert failed.returncode != 0 and "other content" in failed.stderr


def test_restored_topology_keeps_names_and_roles_with_new_ports_and_name() -> None:
    from orchestrator.backup.restore import new_topology
    from orchestrator.osuser import ServiceUser

    user = ServiceUser("buildsmart", 999, 999)
    p = _point("p1", T0)
    topo = new_topology(p, user, replicas=None)
    assert [(g.name, g.role, len(g.members)) for g in topo.groups] == [("coordinator", "coordinator", 2), ("w1", "worker", 2)]
    assert topo.cluster_name == "buildsmart-p1" and topo.layout.time_interval == "1 month"
    ports = [m.port for g in topo.groups for m in g.members]
    assert len(set(ports)) == len(ports)
    plain = new_topology(p, user, replicas=0)
    assert [len(g.members) for g in plain.groups] == [1, 1]


def test_scheduled_work_base_backups_when_stale_points_only_when_restorable() -> None:
    groups = ["coordinator", "w1"]
    fresh = [_backup(g, "b", "0/1", T0 - timedelta(hours=1)) for g in groups]
    stale = [_backup("coordinator", "b", "0/1", T0 - timedelta(hours=1)), _backup("w1", "b", "0/1", T0 - timedelta(hours=30))]
    recent = [_point("p", T0 - timedelta(minutes=10))]
    old = [_point("p", T0 - timedelta(minutes=90))]
    work = decide.scheduled_work(groups, fresh, recent, 60, 24, T0)
    assert (work.base_backups, work.point, work.why) == (False, False, "nothing due")
    assert decide.scheduled_work(groups, fresh, old, 60, 24, T0).point
    stale_work = decide.scheduled_work(groups, stale, recent, 60, 24, T0)
    assert stale_work.base_backups and not stale_work.point and "w1" in stale_work.why
    # no base backup of w1 yet: a point alone would not be restorable, so it comes with the backups
    missing = decide.scheduled_work(groups, fresh[:1], [], 60, 0, T0)
    assert (missing.base_backups, missing.point) == (False, False)
    assert decide.scheduled_work(groups, fresh[:1], [], 60, 24, T0).point
    off = decide.scheduled_work(groups, [], [], 0, 0, T0)
    assert (off.base_backups, off.point) == (False, False)

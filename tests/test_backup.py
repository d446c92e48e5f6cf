"""Backups of the plain shape (the session's main cluster) against real servers and Barman:
restore to a point after a wrong DELETE and a dropped time partition, --to TIME, the original
left untouched, and a point taken while ingest, a fragment move and the metadata mirror run."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator import cluster
from orchestrator.backup import archive, check, decide, ops, points, repo
from orchestrator.backup.task import BackupTask
from orchestrator.elastic.context import open_cluster
from orchestrator.metadata.mirror import run_once
from orchestrator.osuser import service_user
from orchestrator.runtime import mongo
from orchestrator.tasks.registry import TaskContext
from tests.elastic_load import Load
from tests.harness import ClusterHandle, make_tmp_dir, stop_cluster, write_csv

BUILDSMART = str(Path(sys.executable).parent / "buildsmart")


def _cli(*args: str) -> str:
    """``buildsmart ARGS`` (with its own --dir), as a user runs it; its output."""
    proc = subprocess.run([BUILDSMART, *args], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def backed_up(main_cluster: ClusterHandle) -> Iterator[repo.Repository]:
    """A repository for the main cluster and a base backup of every group. Afterwards the
    members stop archiving (other modules do not pay for it) and the repository is deleted."""
    location = make_tmp_dir("bs-repo-") / "repo"
    # no scheduled work from the task runner while the tests run (test_scheduled_point runs it)
    main_cluster.run_cli("backup", "init", "--repo", str(location), "--points-every", "0", "--base-every", "0")
    created = main_cluster.run_cli("backup", "create")
    assert "base backups done: coordinator" in created.stdout + created.stderr
    try:
        yield repo.Repository(location)
    finally:
        topo = main_cluster.topology
        for _group, lm in cluster.local_members(main_cluster.directory, topo, service_user(topo.service_user)):
            archive.remove_conf(lm.data_dir.parent)
        (main_cluster.directory / repo.SETTINGS_FILE).unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(location.parent)], check=False)


@pytest.fixture
def restored_dirs() -> Iterator[list[Path]]:
    """Clusters a test restored: stopped (every process, checked by PID) and deleted afterwards."""
    made: list[Path] = []
    yield made
    for directory in made:
        stop_cluster(ClusterHandle(directory))


def _totals(conn_handle: ClusterHandle, buildings: list[str]) -> dict[str, tuple[int, float]]:
    with conn_handle.coordinator() as conn:
        rows = conn.execute(
            "SELECT building, count(*), sum(kwh) FROM public.readings WHERE building = ANY(%s) GROUP BY 1", (buildings,)
        ).fetchall()
    return {b: (int(n), float(s)) for b, n, s in rows}


def _slots(handle: ClusterHandle) -> dict[str, list[str]]:
    out = {}
    for g in handle.topology.groups:
        with handle.worker(g.name) as conn:
            out[g.name] = sorted(r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall())
    return out


def _repo_state(r: repo.Repository) -> dict[str, str]:
    """Every file that holds backups, WAL or points, with its content hash (Barman's log, lock
    and WAL catalogue files are not backup content)."""
    out = {}
    for path in sorted(r.root.rglob("*")):
        rel = str(path.relative_to(r.root))
        skip = path.name.startswith(".") or path.name.endswith((".log", ".lock", "-xlog.db")) or "/errors/" in rel
        if path.is_file() and not skip:
            out[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def _assert_repo_untouched(before: dict[str, str], after: dict[str, str], timelines: dict[str, int]) -> None:
    """Every file is still there with the same bytes; new files may only be WAL the ORIGINAL
    archived meanwhile (its own timelines): a restored cluster promotes to a new timeline, so WAL
    or a history file from it would show up here."""
    assert {k: after.get(k) for k in before} == before
    for rel in set(after) - set(before):
        name = Path(rel).name
        assert "/wals/" in f"/{rel}" or "/incoming/" in f"/{rel}", f"restore wrote {rel} into the repository"
        group = Path(rel).parts[2]
        assert int(name[:8], 16) <= timelines[group], f"WAL of a new timeline in the repository: {rel}"


def _csv_rows(buildings: list[str], months: list[int], tag: str) -> list[tuple[str, str, str, float]]:
    return [
        (b, tag, f"2031-{m:02d}-{d:02d}T{h:02d}:00:00Z", round(m * 100 + d + h / 100 + i, 3))
        for i, b in enumerate(buildings)
        for m in months
        for d in (1, 15)
        for h in (0, 12)
    ]


def _leaf_of(handle: ClusterHandle, node: str, shard: str, month: int) -> str:
    with handle.worker(node) as conn:
        conn.execute("SET timezone = 'UTC'")
        row = conn.execute(
            "SELECT c.relname FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid "
            "WHERE t.isleaf AND pg_get_expr(c.relpartbound, c.oid) LIKE %s",
            (f"bsdata.{shard}", f"FOR VALUES FROM ('2031-{month:02d}-01%"),
        ).fetchone()
    assert row is not None, f"no 2031-{month:02d} partition of {shard} on {node}"
    return str(row[0])


def test_restore_to_point_undoes_delete_and_dropped_partition_and_leaves_original_alone(
    main_cluster: ClusterHandle, backed_up: repo.Repository, token: str, restored_dirs: list[Path], tmp_path: Path
) -> None:
    other = f"b4{token}"  # fragment [b3, b6) on w2; "b2" is in [MIN, b3) on w1
    buildings = ["b2", other]
    try:
        main_cluster.run_cli("ingest", str(write_csv(tmp_path / "a.csv", _csv_rows(buildings, [1, 2, 3], "electricity"))))
        p1 = main_cluster.run_cli("backup", "point", f"p1{token}")
        assert re.search(r"write pause [0-9.]+ ms", p1.stdout + p1.stderr)
        at_p1 = _totals(main_cluster, buildings)
        assert at_p1["b2"][0] == 12 and at_p1[other][0] == 12
        time.sleep(1.2)
        between = datetime.now(UTC)
        time.sleep(1.2)
        # keep writing after the point, then the mistakes
        main_cluster.run_cli("ingest", str(write_csv(tmp_path / "b.csv", _csv_rows(buildings, [3, 4], "gas"))))
        main_cluster.run_cli("backup", "point", f"p2{token}")
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building = 'b2'")
        with open_cluster(main_cluster.directory) as el:
            frag = next(f for f in el.fragments() if f.range_from == "b3")
        leaf = _leaf_of(main_cluster, frag.node, frag.shard_name, 2)
        with main_cluster.worker(frag.node) as conn:
            conn.execute(f"DROP TABLE bsdata.{leaf}")
        after = _totals(main_cluster, buildings)
        assert "b2" not in after and after[other][0] == 12 - 4 + 8
        main_cluster.run_cli("backup", "list")  # files the archived WAL, so the repository is quiet now
        slots_before, repo_before = _slots(main_cluster), _repo_state(backed_up)
        timelines = {}
        for g in main_cluster.topology.groups:
            with main_cluster.worker(g.name) as conn:
                row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
                timelines[g.name] = int(row[0]) if row else 0
        assert repo_before

        new = make_tmp_dir("bs-restored-") / "cluster"
        restored_dirs.append(new)
        text = _cli("backup", "restore", "--to", between.isoformat(), "--from", str(main_cluster.directory), "--dir", str(new))
        assert f"restore point p1{token}" in text and "the latest at or before" in text  # --to TIME picked p1, not p2

        point = points.load_point(backed_up, f"p1{token}")
        assert check.compare(point, new) == []  # every fragment: catalog and per-partition checksums of the point
        restored = ClusterHandle(new)
        assert _totals(restored, buildings) == at_p1  # b2 is back, the later gas rows are not
        assert _leaf_of(restored, frag.node, frag.shard_name, 2) == leaf  # the dropped partition is back
        # the restored cluster answers through its own foreign servers, on its own ports
        with restored.coordinator(admin=False) as conn:
            assert conn.execute("SELECT count(*) FROM readings WHERE building = 'b2'").fetchone() == (12,)
            ports = conn.execute("SELECT string_agg(ports, ',') FROM buildsmart.nodes").fetchone()
        original_ports = {str(m.port) for g in main_cluster.topology.groups for m in g.members}
        assert ports is not None and not set(str(ports[0]).split(",")) & original_ports

        # the original: same rows, same slots, repository content unchanged
        assert _totals(main_cluster, buildings) == after
        assert _slots(main_cluster) == slots_before
        _assert_repo_untouched(repo_before, _repo_state(backed_up), timelines)
    finally:
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building = 'b2'")


def test_point_under_ingest_move_and_mirror_restores_fragments_that_agree_with_the_catalog(
    main_cluster: ClusterHandle, backed_up: repo.Repository, token: str
) -> None:
    buildings = [f"b5{token}{i}" for i in range(4)]  # fragment [b3, b6)
    with main_cluster.coordinator() as conn:  # enough rows that the move's copy takes a while
        conn.execute(
            "INSERT INTO readings SELECT b, 'electricity', t, extract(epoch FROM t)::int %% 97 FROM unnest(%s::text[]) b, "
            "generate_series('2031-05-01'::timestamptz, '2031-06-30 23:50', '1 minute') t",
            (buildings,),
        )
    with open_cluster(main_cluster.directory) as el:
        frag = next(f for f in el.fragments() if f.range_from == "b3")
    home, away = frag.node, next(w.name for w in main_cluster.topology.workers if w.name != frag.node)
    uri = mongo.ensure_started(main_cluster.directory)
    assert uri
    run_once(main_cluster.directory)
    mirror = subprocess.Popen([BUILDSMART, "mirror", "--dir", str(main_cluster.directory)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    load = Load(main_cluster, buildings)
    load.committed.update(_totals(main_cluster, buildings))
    load.started_rows = sum(n for n, _ in load.committed.values())
    mover_out: list[subprocess.CompletedProcess[str]] = []
    mover = threading.Thread(
        target=lambda: mover_out.append(main_cluster.run_cli("fragment", "move", str(frag.fragment_id), away))
    )
    name = f"load{token}"
    try:
        with main_cluster.coordinator() as conn:  # device changes for the mirror while the point is made
            conn.execute("INSERT INTO public.devices (id, building, kind, metadata) VALUES (%s, 'tbench', 'point', '{}')",
                         (f"dev-{token}",))  # fmt: skip
        load.start()
        mover.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the point lands while the move copies/streams (before its switch)
            with main_cluster.coordinator() as conn:
                step = conn.execute(
                    "SELECT step FROM buildsmart.jobs WHERE kind = 'move' AND state = 'running' "
                    "AND (args->>'fragment_id')::int = %s",
                    (frag.fragment_id,),
                ).fetchone()
            if step and step[0] in ("subscribed", "target_created"):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the move never reached its copy phase")
        with open_cluster(main_cluster.directory, "test:point") as el:  # the function a periodic task calls
            made = points.make_restore_point(el, name, "schedule")
        assert made.name == name and made.pause_ms > 0
        mover.join(timeout=300)
        load.stop()
        load.check()
        assert mover_out and mover_out[0].returncode == 0
    finally:
        load.stop()
        mirror.terminate()
        mirror.wait(30)
        mongo.stop(main_cluster.directory)
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM public.devices WHERE id = %s", (f"dev-{token}",))
        if mover.is_alive():
            mover.join(timeout=300)
        with open_cluster(main_cluster.directory) as el:
            if el.fragment(frag.fragment_id).node != home:
                main_cluster.run_cli("fragment", "move", str(frag.fragment_id), home)
    point = points.load_point(backed_up, name)
    assert sum(n for sums in point.checksums.values() for n, _ in sums.values()) > 0
    assert any(f.fragment_id == frag.fragment_id for f in point.fragments)
    # verify restores into a scratch directory: catalog and every fragment equal the point
    verified = main_cluster.run_cli("backup", "verify", name)
    assert f"verified {name}" in verified.stdout + verified.stderr
    # the move was open (before its switch) at the point: the restored cluster rolled it back
    assert f"(move of fragment {frag.fragment_id}): not switched at the point; rolled back" in verified.stdout + verified.stderr
    assert point.pause_ms < 1000


def test_point_names_are_checked_and_unique(main_cluster: ClusterHandle, backed_up: repo.Repository, token: str) -> None:
    bad = main_cluster.run_cli("backup", "point", "no spaces", check=False)
    assert bad.returncode == 2 and "restore point name" in bad.stderr
    main_cluster.run_cli("backup", "point", f"u{token}")
    again = main_cluster.run_cli("backup", "point", f"u{token}", check=False)
    assert again.returncode == 4 and "exists already" in again.stderr
    with main_cluster.coordinator() as conn:
        row = conn.execute(
            "SELECT catalog_version, lsns FROM buildsmart.restore_points WHERE name = %s", (f"u{token}",)
        ).fetchone()
    assert row is not None and set(row[1]) == {g.name for g in main_cluster.topology.groups}
    # the task runner's backup task, as the runner calls it: a point is due, base backups are off
    main_cluster.run_cli("backup", "init", "--points-every", "0.001")
    try:
        with open_cluster(main_cluster.directory, "test:task") as el:
            outcome = BackupTask().run(TaskContext(main_cluster.directory, el, lambda: False))
    finally:
        main_cluster.run_cli("backup", "init", "--points-every", "0")
    assert outcome.acted and "restore point schedule-" in outcome.summary and "base backups" not in outcome.summary
    assert any(p.reason == "schedule" for p in points.load_points(backed_up))
    status = main_cluster.run_cli("backup", "status", "--json")
    assert '"configured": true' in status.stdout and '"failing_archivers": []' in status.stdout
    assert datetime.now(UTC) - points.load_point(backed_up, f"u{token}").created_at < timedelta(minutes=1)


def _archiver(handle: ClusterHandle, group: str) -> tuple[int, bool]:
    """(failed_count, whether the last attempt failed) of the group's member."""
    with handle.worker(group) as conn:
        row = conn.execute(
            "SELECT failed_count, coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) "
            "FROM pg_stat_archiver"
        ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


def _new_segment(handle: ClusterHandle, group: str) -> None:
    with handle.worker(group) as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'bs-test', 'x'), pg_switch_wal()")


def _wait(what: str, check_fn: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check_fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# Last in this module: retention deletes the base backups the other tests restored from.
def test_failing_archive_is_loud_and_retention_keeps_by_count_and_age(
    main_cluster: ClusterHandle, backed_up: repo.Repository
) -> None:
    incoming = backed_up.incoming("w1")
    failed_before = _archiver(main_cluster, "w1")[0]
    incoming.chmod(0o555)  # the archive command (service user) cannot write there
    try:
        _new_segment(main_cluster, "w1")
        _wait("an archive failure on w1", lambda: _archiver(main_cluster, "w1")[0] > failed_before)
        bad = main_cluster.run_cli("backup", "status", check=False)
        assert bad.returncode == 4 and "WAL ARCHIVING FAILS on w1-0" in bad.stdout
        assert "WAL ARCHIVING FAILS on w1-0" in main_cluster.run_cli("status").stdout
    finally:
        incoming.chmod(0o755)
    _new_segment(main_cluster, "w1")  # a new .ready file wakes the archiver: it retries in order
    _wait("archiving on w1 to recover", lambda: not _archiver(main_cluster, "w1")[1])
    good = main_cluster.run_cli("backup", "status", check=False)
    assert good.returncode == 0 and "backups ok" in good.stdout, good.stdout

    before = {b.group: b.backup_id for b in ops.all_backups(backed_up)}
    main_cluster.run_cli("backup", "init", "--keep", "1", "--keep-days", "0")
    out = main_cluster.run_cli("backup", "create")
    text = out.stdout + out.stderr
    for group, backup_id in before.items():
        assert f"retention: deleted base backup {backup_id} of {group}" in text
    after = ops.all_backups(backed_up)
    assert sorted(b.group for b in after) == sorted(before)  # one per group: the new one
    assert "no longer restorable and was removed" in text  # the points made before it went with the old backups
    assert all(decide.restorable(p, after) for p in points.load_points(backed_up))

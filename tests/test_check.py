"""`buildsmart check` on the session's HA cluster: clean when clean, and each planted inconsistency
reported (catalog, rows out of range, rows out of their time partition, a replica that differs
from its primary, a damaged index page)."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from orchestrator import catalog, check, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.energy import rollups
from orchestrator.fragments import Fragment, Router
from orchestrator.osuser import service_user
from orchestrator.runtime import patroni, supervisor
from tests import ha_tools


@pytest.fixture(scope="module")
def loaded(ha_dir: Path) -> Iterator[Path]:
    ha_tools.wait_healthy(ha_dir)
    tok = uuid.uuid4().hex[:6]
    with _coordinator(ha_dir) as conn:
        for p in ("a", "c", "t", "z"):
            conn.execute(
                "INSERT INTO readings SELECT %s, m, timestamptz '2024-01-01' + h * interval '1 hour', h %% 17 "
                "FROM generate_series(0, 1500) h, (VALUES ('el'), ('gas')) v(m)",
                (f"{p}chk{tok}",),
            )
    yield ha_dir
    with _coordinator(ha_dir) as conn:
        conn.execute("DELETE FROM readings WHERE building LIKE %s", (f"%chk{tok}%",))


@contextmanager
def _coordinator(directory: Path) -> Iterator[psycopg.Connection]:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "test", autocommit=True, search_path=None) as conn:
        yield conn


@contextmanager
def _worker(directory: Path, node: str) -> Iterator[psycopg.Connection]:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.group(node), creds), "test", autocommit=True, search_path=None) as conn:
        yield conn


def _fragment(directory: Path, building: str) -> Fragment:
    with _coordinator(directory) as conn:
        return Router(catalog.load_fragments(conn)).route(building)


def _fragment_of(directory: Path, building: str) -> tuple[str, str]:
    frag = _fragment(directory, building)
    return frag.shard_name, frag.node


def test_a_clean_cluster_is_clean(loaded: Path) -> None:
    report = check.run_check(loaded)
    assert report.ok, "\n".join(map(str, report.findings))
    assert report.fragments == 5 and report.partitions >= 5
    # every fragment of both workers and the coordinator's tables, against one replica each
    assert report.replicas_compared == 6
    with _coordinator(loaded) as conn:
        last = check.last_check(conn)
    assert last is not None and last.ok
    # the status snapshot (CLI, /metrics, console) carries it
    from orchestrator import status

    snap = status.collect(loaded)
    assert snap.last_check is not None and snap.last_check.ok and snap.last_check.summary == report.summary()


def test_catalog_inconsistencies_are_reported(loaded: Path) -> None:
    shard, node = _fragment_of(loaded, "c")
    with _worker(loaded, node) as w:
        w.execute('CREATE TABLE bsdata.readings_f999 (building text COLLATE "C", ts timestamptz) PARTITION BY RANGE (ts)')
    with _coordinator(loaded) as c:
        c.execute(f"ALTER FOREIGN TABLE bsdata.{shard} OPTIONS (SET table_name 'readings_f998')")
    try:
        report = check.run_check(loaded, replicas=False, pages=False)
        found = {(f.kind, f.node, f.obj) for f in report.findings}
        assert ("catalog", node, "readings_f999") in found, report.findings
        assert ("catalog", "coordinator", shard) in found, report.findings
        # the CLI says the same and exits 6
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "check", "--no-replicas", "--no-pages", "--dir", str(loaded)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 6 and "readings_f999" in proc.stdout, proc.stdout + proc.stderr
    finally:
        with _worker(loaded, node) as w:
            w.execute("DROP TABLE bsdata.readings_f999")
        with _coordinator(loaded) as c:
            c.execute(f"ALTER FOREIGN TABLE bsdata.{shard} OPTIONS (SET table_name '{shard}')")
    assert check.run_check(loaded, replicas=False, pages=False).ok


def test_rows_outside_their_fragment_and_partition_are_reported(loaded: Path) -> None:
    shard, node = _fragment_of(loaded, "c")
    with _worker(loaded, node) as w:
        rule = w.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
            (f"bsdata.{shard}",),
        ).fetchone()
        assert rule is not None
        leaf, lo, hi = w.execute(
            "SELECT c.relname, (regexp_match(pg_get_expr(c.relpartbound, c.oid), $$FROM \\('([^']+)'\\)$$))[1], "
            "(regexp_match(pg_get_expr(c.relpartbound, c.oid), $$TO \\('([^']+)'\\)$$))[1] "
            "FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid "
            "WHERE t.isleaf AND pg_get_expr(c.relpartbound, c.oid) LIKE 'FOR VALUES FROM%%' LIMIT 1",
            (f"bsdata.{shard}",),
        ).fetchone()
        # a row outside the building range: the CHECK is re-added without validating it
        w.execute(f"ALTER TABLE bsdata.{shard} DROP CONSTRAINT {rule[0]}")
        w.execute(f"INSERT INTO bsdata.{shard} VALUES ('~outside', 'el', '2024-02-02', 1)")
        w.execute(f"ALTER TABLE bsdata.{shard} ADD CONSTRAINT {rule[0]} {rule[1]} NOT VALID")
        # a row in the wrong time partition: detached, written, re-attached without PostgreSQL's scan
        w.execute(f"ALTER TABLE bsdata.{shard} DETACH PARTITION bsdata.{leaf}")
        lo_lit, hi_lit = sql.Literal(lo).as_string(w), sql.Literal(hi).as_string(w)
        w.execute(f"INSERT INTO bsdata.{leaf} VALUES ('c-misplaced', 'el', {lo_lit}::timestamptz - interval '1 day', 2)")
        w.execute(f"ALTER TABLE bsdata.{leaf} ADD CONSTRAINT planted CHECK (ts >= {lo_lit} AND ts < {hi_lit}) NOT VALID")
        w.execute("UPDATE pg_constraint SET convalidated = true WHERE conname = 'planted'")
        w.execute(f"ALTER TABLE bsdata.{shard} ATTACH PARTITION bsdata.{leaf} FOR VALUES FROM ({lo_lit}) TO ({hi_lit})")
        w.execute(f"ALTER TABLE bsdata.{leaf} DROP CONSTRAINT planted")
        # roll the planted rows up now, as the task runner may do at any moment anyway
        rolled = bool(rollups.rollup_tables(w, shard))
        if rolled:
            rollups.refresh_fragment(w, _fragment(loaded, "c"))
    try:
        report = check.run_check(loaded, replicas=False, pages=False)
        found = {(f.kind, f.obj) for f in report.findings}
        assert ("placement", shard) in found, report.findings
        assert ("placement", leaf) in found, report.findings
        if rolled:
            assert ("placement", rollups.rollup_table(shard, "hourly")) in found, report.findings
    finally:
        with _worker(loaded, node) as w:
            w.execute(f"DELETE FROM bsdata.{shard} WHERE building IN ('~outside', 'c-misplaced')")
            w.execute(f"ALTER TABLE bsdata.{shard} VALIDATE CONSTRAINT {rule[0]}")
            # the DELETE logged the change for the rollups: refresh it now rather than wait for
            # the task runner's next round
            if rollups.rollup_tables(w, shard):
                rollups.refresh_fragment(w, _fragment(loaded, "c"))
    after = check.run_check(loaded, replicas=False, pages=False)
    assert after.ok, "\n".join(map(str, after.findings))


# ---------------------------------------------------------------- pages of a stopped replica

_BASE = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)  # fmt: skip


def _page_checksum(page: bytes, blkno: int) -> int:
    """PostgreSQL's pg_checksum_page (storage/checksum_impl.h), so a planted change passes the
    page checksum and reaches the data like a silent divergence would."""
    data = bytearray(page)
    data[8:10] = b"\0\0"
    words = struct.unpack("<2048I", data)
    sums = list(_BASE)
    for i in range(0, 2048, 32):
        for j in range(32):
            tmp = sums[j] ^ words[i + j]
            sums[j] = ((tmp * 16777619) & 0xFFFFFFFF) ^ (tmp >> 17)
    for _ in range(2):
        for j in range(32):
            tmp = sums[j]
            sums[j] = ((tmp * 16777619) & 0xFFFFFFFF) ^ (tmp >> 17)
    result = 0
    for s in sums:
        result ^= s
    result ^= blkno
    return (result % 65535) + 1


def _replica_of(directory: Path, node: str) -> patroni.PatroniMember:
    leader = ha_tools.leader(directory, node)
    return next(pm for name, pm in ha_tools.members(directory).items() if pm.group.name == node and name != leader)


@contextmanager
def _stopped(directory: Path, pm: patroni.PatroniMember) -> Iterator[None]:
    """The member stopped while its files are changed. The cluster's supervisor would restart its
    Patroni within a tick (it rejoins dead members), so it is stopped meanwhile and started again
    after the member is back."""
    user = service_user(topology.load(directory).service_user)
    assert supervisor.stop_daemon(directory), "the cluster's supervisor was not running"
    try:
        patroni.stop(pm, user)
        try:
            yield
        finally:
            patroni.start(pm, user)
            ha_tools.wait_member_state(directory, pm.name, "replica", timeout_s=90)
    finally:
        supervisor.start_daemon(directory)
        members = {m.name for g in topology.load(directory).groups for m in g.members}
        assert supervisor.wait_supervising(directory, members, present=True), "the supervisor did not come back"


def test_a_replica_that_differs_and_a_damaged_page_are_reported(loaded: Path) -> None:
    shard, node = _fragment_of(loaded, "t")
    with _worker(loaded, node) as w:
        # frozen and hinted first: a later read on the primary must not log a full-page image
        # (hint bits under data checksums) that the replica would replay over the planted change
        w.execute(f"VACUUM (FREEZE) bsdata.{shard}")
        w.execute("CHECKPOINT")
        lsn = str(w.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
        _leaf, heap, index = w.execute(
            "SELECT c.relname, pg_relation_filepath(c.oid), pg_relation_filepath(i.indexrelid) "
            "FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid "
            "JOIN pg_index i ON i.indrelid = c.oid WHERE t.isleaf AND pg_relation_size(c.oid) > 0 "
            "ORDER BY pg_relation_size(c.oid) DESC LIMIT 1",
            (f"bsdata.{shard}",),
        ).fetchone()
    pm = _replica_of(loaded, node)
    ha_tools.wait_member_state(loaded, pm.name, "replica")
    # a restartpoint on the replica after the rows: its restart must not replay full-page images
    # of these pages over the planted change
    creds = topology.load_credentials(loaded)
    member = pm.local.member
    with psycopg.connect(
        host=member.host,
        port=member.port,
        dbname="buildsmart",
        user=creds.superuser,
        password=creds.superuser_password,
        autocommit=True,
    ) as replica:
        while not replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:  # type: ignore[index]
            time.sleep(0.05)
        replica.execute("CHECKPOINT")
    heap_file, index_file = pm.local.data_dir / heap, pm.local.data_dir / index
    with _stopped(loaded, pm):
        original_heap = heap_file.read_bytes()
        original_index = index_file.read_bytes()
        page = bytearray(original_heap[:8192])
        lp = struct.unpack_from("<I", page, 24)[0]  # first line pointer
        off, length = lp & 0x7FFF, (lp >> 17) & 0x7FFF
        kwh_at = off + length - 8  # kwh is the last column, a float8
        (kwh,) = struct.unpack_from("<d", page, kwh_at)
        struct.pack_into("<d", page, kwh_at, kwh + 1000.0)
        struct.pack_into("<H", page, 8, _page_checksum(bytes(page), 0))
        heap_file.write_bytes(bytes(page) + original_heap[8192:])
        damaged = bytearray(original_index)
        damaged[8192 + 200] ^= 0xFF  # a byte inside the first index page after the metapage
        index_file.write_bytes(bytes(damaged))
    try:
        report = check.run_check(loaded)
        by_kind = {f.kind for f in report.findings}
        replica = [f for f in report.findings if f.kind == "replica"]
        assert len(replica) == 1 and replica[0].obj.startswith(shard), report.findings
        assert "corruption" in by_kind, report.findings
        assert all(f.kind in ("replica", "corruption") for f in report.findings), report.findings
    finally:
        with _stopped(loaded, pm):
            heap_file.write_bytes(original_heap)
            index_file.write_bytes(original_index)
    assert check.run_check(loaded).ok


def test_the_scheduled_check_is_due_a_day_after_the_last_run_or_the_cluster_start() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    created = now - timedelta(hours=30)
    assert check.check_due(None, created, now)  # never ran, cluster a day old
    assert not check.check_due(None, now - timedelta(minutes=5), now)  # a new cluster loading its data
    recent = catalog.CheckRun(now - timedelta(hours=3), True, "ok")
    assert not check.check_due(recent, created, now)
    old = catalog.CheckRun(now - timedelta(hours=24, seconds=1), False, "1 finding")
    assert check.check_due(old, created, now)

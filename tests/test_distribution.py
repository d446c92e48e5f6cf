"""Data that distributes itself, on a real cluster: the first load lays out the fragments from its
own buildings (any id shape, byte order, pruning to one fragment), the background balancer evens
bytes out while ingest and readers run, survives kill -9 of its process, splits a building too
big for a fragment by time, and `status` shows what it did without counting rows.

One cluster for the module (3 workers, plain servers, no split points given, the task runner
running as after `up`). Tests run in file order: the first ones need empty fragments."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from orchestrator import catalog
from orchestrator.elastic import autosplit, move
from orchestrator.elastic.context import open_cluster
from orchestrator.fragments import Fragment, Router, c_order
from orchestrator.tasks import runner as tasks_runner
from tests.harness import ClusterHandle, start_cluster, stop_cluster
from tests.test_distribution_planning import ODD_IDS
from tests.test_elastic_ingest import Ingest, Reader, check_stored, make_workload

WORKERS = ("w1", "w2", "w3")
T0 = datetime(2023, 1, 1, tzinfo=UTC)
# Ids of every shape: the odd ones, Haystack refs and long UUID-like ids with long common prefixes.
BUILDINGS = [*ODD_IDS, *(f"p:demo:r:21986bd2-8152fe4e-{i:04d}" for i in range(30)), *(f"site/{i:03d}" for i in range(30))]


@pytest.fixture(scope="module")
def dcluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-dist-", workers=3, split_points=None, balancer=True)
    try:
        yield handle
    finally:
        stop_cluster(handle)


def _write_input(path: Path, buildings: list[str], hours: int, seed: int = 0) -> dict[str, tuple[int, float]]:
    """A building-sorted CSV (quoted where needed); returns rows and kWh sum per building."""
    ref: dict[str, tuple[int, float]] = {}
    lines = ["building,meter,ts,kwh"]
    for i, b in enumerate(sorted(buildings, key=c_order)):
        n = hours * (1 + (i + seed) % 3)  # uneven sizes
        quoted = '"' + b.replace('"', '""') + '"' if any(c in b for c in ',"') or b != b.strip() else b
        for h in range(n):
            ts = (T0 + timedelta(hours=h)).isoformat()
            lines.append(f"{quoted},el,{ts},{h % 7}")
        ref[b] = (n, float(sum(h % 7 for h in range(n))))
    path.write_text("\n".join(lines) + "\n")
    return ref


def _stored(handle: ClusterHandle, buildings: list[str]) -> dict[str, tuple[int, float]]:
    with handle.coordinator() as conn:
        rows = conn.execute(
            "SELECT building, count(*), sum(kwh) FROM public.readings WHERE building = ANY(%s) GROUP BY 1", (buildings,)
        ).fetchall()
    return {str(b): (int(n), float(s)) for b, n, s in rows}


def _scans(conn: psycopg.Connection, where: str, params: tuple[object, ...]) -> list[str]:
    """The foreign tables a query on readings scans (from EXPLAIN)."""
    plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN (COSTS OFF) SELECT * FROM public.readings WHERE {where}", params))
    # the distributed scan lists each worker's fragments ("Node bs_w1: readings_f2, readings_f5");
    # the PostgreSQL plan (pushdown off or not possible) has a Foreign Scan per fragment
    names = re.findall(r"Foreign Scan on (?:bsdata\.)?(readings_f\d+)", plan)
    for listed in re.findall(r"^\s*Node [^:]+: (.*)$", plan, flags=re.M):
        names += re.findall(r"readings_f\d+", listed)
    return sorted(f"bsdata.{name}" for name in names)


def _settings(handle: ClusterHandle, **settings: object) -> None:
    with handle.coordinator() as conn:
        catalog.set_balancer_settings(conn, {k: str(v) for k, v in settings.items()})


def _pause(handle: ClusterHandle, paused: bool) -> None:
    with handle.coordinator() as conn:
        catalog.set_paused(conn, paused, "test" if paused else None)
        if paused:  # an operation already running finishes first
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM buildsmart.jobs WHERE state = 'running'").fetchone() != (0,):
                assert time.monotonic() < deadline, "a balancer operation did not finish"
                time.sleep(0.2)


def _node_bytes(handle: ClusterHandle) -> dict[str, int]:
    data = json.loads(handle.run_cli("status", "--json").stdout)
    return {w["node"]: int(w["bytes"]) for w in data["workers"]}


def _check_clean(handle: ClusterHandle) -> None:
    with handle.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM buildsmart.jobs WHERE state IN ('scheduled', 'running')").fetchone() == (0,)
        frags = catalog.load_fragments(conn)
        attached = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'bsdata' AND c.relkind = 'f' AND c.relispartition "
                "AND c.oid IN (SELECT relid FROM pg_partition_tree('public.readings'))"  # not the rollups' partitions
            ).fetchall()
        }
    Router(frags)  # ranges (and time ranges) tile everything
    assert attached == {f.shard_name for f in frags}
    for node in WORKERS:
        with handle.worker(node) as w:
            tables = {
                r[0]
                for r in w.execute(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'bsdata' AND c.relkind = 'p' AND NOT c.relispartition"
                ).fetchall()
            }
            assert tables == {f.shard_name for f in frags if f.node == node}, node
            assert w.execute("SELECT count(*) FROM pg_subscription").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'bs_split_mirror'").fetchone() == (0,)


def test_runner_runs_after_up_and_new_cluster_has_a_placeholder_layout(dcluster: ClusterHandle) -> None:
    assert tasks_runner.daemon_pid(dcluster.directory) is not None
    with dcluster.coordinator() as conn:
        assert [(f.range_from, f.range_to) for f in catalog.load_fragments(conn)] == [(None, None)]
        assert catalog.balancer_state(conn).auto_layout
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM buildsmart.task_runs WHERE task = 'balancer' AND runs > 0").fetchone() != (1,):
            assert time.monotonic() < deadline, "the task runner never ran the balancer"
            time.sleep(0.2)


def test_killed_relayout_is_redone_by_the_next_load(dcluster: ClusterHandle, tmp_path: Path) -> None:
    """A load killed while it replaces the empty fragments: the next load rolls the half-done
    re-layout back, redoes it, and nothing is left over."""
    path = tmp_path / "first.csv"
    _write_input(path, BUILDINGS, hours=24)
    with dcluster.coordinator() as holder, dcluster.coordinator() as conn:
        # A loader batch in flight holds the placeholder fragment's write lock: the switch waits.
        (fid,) = [f.fragment_id for f in catalog.load_fragments(conn)]
        holder.execute("BEGIN")
        holder.execute("SELECT buildsmart.fragment_write_lock(ARRAY[%s])", (fid,))
        code = (
            "import sys; from pathlib import Path; from orchestrator.elastic.autosplit import presplit_for_file; "
            "presplit_for_file(Path(sys.argv[1]), sys.argv[2])"
        )
        cmd = [sys.executable, "-c", code, str(dcluster.directory), str(path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while conn.execute(
            "SELECT count(*) FROM buildsmart.jobs WHERE kind = 'relayout' AND state = 'running' AND step = 'tables_created'"
        ).fetchone() != (1,):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        holder.execute("ROLLBACK")
        new_tables = sum(
            int(dcluster_worker_count(dcluster, node, "SELECT count(*) FROM pg_class WHERE relname ~ '^readings_f[0-9]+$'"))
            for node in WORKERS
        )
        assert new_tables > 1  # the killed run had made its new tables
    result = dcluster.run_cli("ingest", str(path))
    assert "rejected 0" in result.stdout
    with dcluster.coordinator() as conn:
        assert conn.execute("SELECT state FROM buildsmart.jobs WHERE kind = 'relayout' ORDER BY job_id").fetchall()[0] == (
            "done",
        )
        frags = catalog.load_fragments(conn)
    assert len(frags) > 3
    _check_clean(dcluster)


def dcluster_worker_count(handle: ClusterHandle, node: str, query: str) -> int:
    with handle.worker(node) as w:
        row = w.execute(query).fetchone()
    return int(row[0]) if row else 0


def test_first_load_spreads_any_building_ids_and_pruning_hits_one_fragment(dcluster: ClusterHandle, tmp_path: Path) -> None:
    ref = _write_input(tmp_path / "again.csv", BUILDINGS, hours=24)
    with dcluster.coordinator() as conn:
        frags = catalog.load_fragments(conn)
        decisions = catalog.recent_decisions(conn, 50)
    presplit = [d for d in decisions if d.action == "presplit"]
    assert presplit and presplit[0].outcome == "done" and "buildings" in presplit[0].reason
    assert 3 < len(frags) <= 9 and {f.node for f in frags} == set(WORKERS)
    assert _stored(dcluster, BUILDINGS) == ref  # every row once
    for node in WORKERS:  # every worker holds rows
        assert (
            dcluster_worker_count(dcluster, node, "SELECT sum(n_live_tup) FROM pg_stat_user_tables WHERE schemaname = 'bsdata'")
            > 0
        )
    router = Router(frags)
    with dcluster.coordinator(admin=False) as conn:
        for b in BUILDINGS:
            scans = _scans(conn, "building = %s", (b,))
            assert scans == [f"bsdata.{router.route(b).shard_name}"], (b, scans)
        lo, hi = sorted(BUILDINGS, key=c_order)[:2]
        assert len(_scans(conn, "building >= %s AND building < %s", (lo, hi))) == 1
    # A second load of the same file: the fragments hold rows now, the layout stays.
    dcluster.run_cli("ingest", str(tmp_path / "again.csv"))
    with dcluster.coordinator() as conn:
        assert catalog.load_fragments(conn) == frags
    assert _stored(dcluster, BUILDINGS) == ref


def test_explicit_split_points_are_kept(main_cluster: ClusterHandle) -> None:
    result = autosplit.presplit_for_load(main_cluster.directory, {"a": 10, "zz": 10, "t1": 5})
    assert not result.changed and "given by the user" in result.reason


@pytest.mark.slow
def test_balancer_evens_bytes_during_ingest_without_losing_or_doubling_rows(dcluster: ClusterHandle) -> None:
    _pause(dcluster, True)
    with open_cluster(dcluster.directory) as el:
        for f in el.fragments():  # everything on w1: the balancer has work to do
            if f.node != "w1":
                move.move_fragment(el, f.fragment_id, "w1")
    # Small thresholds for a small cluster; never "busy", so it works while the ingest runs.
    _settings(dcluster, min_cluster_bytes="1MB", min_split_bytes="1MB", busy_rows_per_s=1e9, tolerance=0.25, interval_s=1)
    work = make_workload(dcluster, dcluster.directory.parent, "dz", 7)
    ingest = Ingest.start(dcluster, work.path)
    reader = Reader(dcluster, work)
    try:
        ingest.wait_loading(dcluster, work.buildings, 5_000)
        reader.start()
        _pause(dcluster, False)
        outcome = ingest.finish()
        deadline = time.monotonic() + 300
        while True:
            sizes = _node_bytes(dcluster)
            mean = sum(sizes.values()) / len(sizes)
            if all(abs(v - mean) <= 0.25 * mean for v in sizes.values()):
                break
            assert time.monotonic() < deadline, f"not balanced after 5 minutes: {sizes}"
            time.sleep(1)
    finally:
        reader.stop()
        ingest.kill()
        work.path.unlink(missing_ok=True)
    assert ingest.proc.returncode == 0, outcome
    assert not reader.bad, reader.bad[:5]
    assert reader.reads > 5
    check_stored(dcluster, work)
    _pause(dcluster, True)
    _check_clean(dcluster)
    with dcluster.coordinator() as conn:
        done = [d for d in catalog.recent_decisions(conn, 200, idle=False) if d.outcome == "done" and d.action == "move"]
    assert done and all(d.reason and d.job_id for d in done)
    assert "re-routing" in ingest.new_log()  # the ingest followed the balancer's switches


def _wait_job(handle: ClusterHandle, kind: str, steps: tuple[str, ...], timeout_s: float = 120) -> int:
    with handle.coordinator() as conn:
        deadline = time.monotonic() + timeout_s
        while True:
            row = conn.execute(
                "SELECT job_id FROM buildsmart.jobs WHERE kind = %s AND state = 'running' AND step = ANY(%s) "
                "ORDER BY job_id DESC",
                (kind, list(steps)),
            ).fetchone()
            if row is not None:
                return int(row[0])
            assert time.monotonic() < deadline, f"no {kind} job reached {steps}"
            time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_of_the_task_runner_mid_move_is_finished_by_the_next_run(dcluster: ClusterHandle) -> None:
    _pause(dcluster, True)
    with open_cluster(dcluster.directory) as el:
        for f in el.fragments():
            if f.node != "w2":
                move.move_fragment(el, f.fragment_id, "w2")
    before = _stored(dcluster, BUILDINGS)
    _settings(dcluster, min_cluster_bytes="1MB", min_split_bytes="1MB", busy_rows_per_s=1e9, tolerance=0.25, interval_s=1)
    _pause(dcluster, False)
    job = _wait_job(dcluster, "move", ("subscribed", "target_created"))
    pid = tasks_runner.daemon_pid(dcluster.directory)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with dcluster.coordinator() as conn:
        assert conn.execute("SELECT state FROM buildsmart.jobs WHERE job_id = %s", (job,)).fetchone() == ("running",)
    dcluster.run_cli("tasks", "start")  # what `up` does after a crash
    with dcluster.coordinator() as conn:
        deadline = time.monotonic() + 120
        while conn.execute("SELECT state FROM buildsmart.jobs WHERE job_id = %s", (job,)).fetchone() == ("running",):
            assert time.monotonic() < deadline, "the next run did not finish the interrupted move"
            time.sleep(0.2)
        state = conn.execute("SELECT state FROM buildsmart.jobs WHERE job_id = %s", (job,)).fetchone()
        assert state in (("done",), ("failed",))
        # the killed run's decision takes its job's outcome (status shows what happened to it): the
        # next balancer round settles it, after the job ended
        deadline = time.monotonic() + 60
        settled = "SELECT outcome FROM buildsmart.balancer_log WHERE job_id = %s"
        while (outcome := conn.execute(settled, (job,)).fetchone()) is None:
            assert time.monotonic() < deadline, "the killed run's decision was not settled with its job's outcome"
            time.sleep(0.2)
        assert outcome == state
    _pause(dcluster, True)
    assert _stored(dcluster, BUILDINGS) == before
    _check_clean(dcluster)


@pytest.mark.slow
def test_building_too_big_for_a_fragment_is_split_by_time(dcluster: ClusterHandle, tmp_path: Path) -> None:
    big = "campus meter farm"
    hours = 24 * 365 * 2
    lines = ["building,meter,ts,kwh"]
    for m in range(12):
        lines += [f"{big},m{m:02d},{(T0 + timedelta(hours=h)).isoformat()},{(h + m) % 11}" for h in range(hours)]
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    ref_rows, ref_sum = 12 * hours, float(sum((h + m) % 11 for m in range(12) for h in range(hours)))
    dcluster.run_cli("ingest", str(tmp_path / "big.csv"))
    _settings(
        dcluster, min_cluster_bytes="1MB", min_split_bytes="1MB", split_bytes="8MB", busy_rows_per_s=1e9, tolerance=0.3,
        interval_s=1, max_fragments_per_worker=30,
    )  # fmt: skip
    _pause(dcluster, False)
    deadline = time.monotonic() + 600
    with dcluster.coordinator() as conn:
        while True:
            frags = [f for f in catalog.load_fragments(conn) if f.holds(big)]
            if len({f.node for f in frags}) >= 2 and all(f.time_group for f in frags):
                break
            assert time.monotonic() < deadline, f"{big!r} was not split by time onto two workers: {frags}"
            time.sleep(1)
    _pause(dcluster, True)
    assert _stored(dcluster, [big]) == {big: (ref_rows, ref_sum)}
    router = Router(catalog_fragments(dcluster))
    with dcluster.coordinator(admin=False) as conn:
        month = (T0 + timedelta(days=400), T0 + timedelta(days=410))
        one = _scans(conn, "building = %s AND ts >= %s AND ts < %s", (big, *month))
        assert one == [f"bsdata.{router.route(big, month[0]).shard_name}"]  # one time range: one fragment
        assert len(_scans(conn, "building = %s", (big,))) == len(frags)  # the whole building: every time range
        other = next(b for b in BUILDINGS if not any(f.holds(b) for f in frags))
        assert len(_scans(conn, "building = %s", (other,))) == 1  # a building not split by time: one fragment
        total = conn.execute("SELECT count(*), sum(kwh) FROM public.readings WHERE building = %s", (big,)).fetchone()
        assert total == (ref_rows, ref_sum)
    # New readings of the big building are routed by time into the right fragment.
    late = T0 + timedelta(hours=hours + 5)
    (tmp_path / "late.csv").write_text(f"building,meter,ts,kwh\n{big},m00,{late.isoformat()},42\n{big},m00,{T0.isoformat()},43\n")
    dcluster.run_cli("ingest", str(tmp_path / "late.csv"))
    with dcluster.coordinator() as conn:
        got = dict(conn.execute("SELECT ts, kwh FROM public.readings WHERE building = %s AND kwh >= 42", (big,)).fetchall())
    assert got == {late: 42.0, T0: 43.0}
    # COPY through the coordinator (the extension's COPY router) routes them by time as well; the
    # check below would flag a row outside its fragment's time range
    copy_in = "COPY readings (building, meter, ts, kwh) FROM STDIN"
    with dcluster.coordinator(admin=False) as conn, conn.cursor().copy(copy_in) as copy:
        copy.write_row((big, "m01", late, 44.0))
        copy.write_row((big, "m01", T0, 45.0))
    with dcluster.coordinator() as conn:
        got = dict(
            conn.execute(
                "SELECT ts, kwh FROM public.readings WHERE building = %s AND meter = 'm01' AND kwh >= 44", (big,)
            ).fetchall()
        )
    assert got == {late: 44.0, T0: 45.0}
    _check_clean(dcluster)


def catalog_fragments(handle: ClusterHandle) -> tuple[Fragment, ...]:
    with handle.coordinator() as conn:
        return catalog.load_fragments(conn)


def test_status_uses_statistics_unless_exact_and_shows_the_balancer(dcluster: ClusterHandle) -> None:
    dcluster.run_cli("balancer", "pause", "--note", "status test")
    data = json.loads(dcluster.run_cli("status", "--json").stdout)
    assert data["balancer"]["paused"] and data["balancer"]["paused_note"] == "status test"
    assert data["balancer"]["runner"] and data["balancer"]["decisions"]
    assert not any(f["rows_exact"] for f in data["fragments"])
    assert {t["task"] for t in data["tasks"]} == {"backup", "balancer", "integrity-check", "partition-upkeep", "rollups"}
    exact = json.loads(dcluster.run_cli("status", "--json", "--exact").stdout)
    assert all(f["rows_exact"] for f in exact["fragments"])
    with dcluster.coordinator() as conn:
        (total,) = conn.execute("SELECT count(*) FROM public.readings").fetchone() or (0,)
    assert sum(f["rows"] for f in exact["fragments"]) == total
    assert sum(w["rows"] for w in exact["workers"]) == total
    text = dcluster.run_cli("status").stdout
    assert "balancer decisions" in text and "bytes per worker" in text and "status test" in text
    config = dcluster.run_cli("balancer", "config", "tolerance=0.05").stdout
    assert "tolerance = 0.05  (set)" in config
    dcluster.run_cli("balancer", "config", "--reset", "all")
    assert dcluster.run_cli("balancer", "config", "nope=1", check=False).returncode == 2
    dcluster.run_cli("balancer", "resume")
    with dcluster.coordinator() as conn:
        assert not catalog.balancer_state(conn).paused


def _election_holders(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.granted",
        (tasks_runner.ELECTION_LOCK,),
    ).fetchall()
    return [r[0] for r in rows]


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def test_one_runner_is_elected_and_another_takes_over(dcluster: ClusterHandle) -> None:
    first = tasks_runner.daemon_pid(dcluster.directory)
    assert first is not None
    log = dcluster.directory / "second-runner.log"
    with dcluster.coordinator() as conn:
        # the daemon holds the election before a second runner starts (it may just have been restarted)
        _wait_for("the daemon holds the election", lambda: [h.split(":")[-1] for h in _election_holders(conn)] == [str(first)])
        with log.open("wb") as fh:
            second = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.tasks", str(dcluster.directory)], stdout=fh, stderr=subprocess.STDOUT
            )
        try:
            _wait_for("the second runner stands by", lambda: "standing by" in log.read_text())
            holders = _election_holders(conn)
            assert len(holders) == 1 and holders[0].endswith(f":{first}"), holders
            tasks_runner.stop_daemon(dcluster.directory)
            _wait_for(
                "the standby runner takes over", lambda: [h.split(":")[-1] for h in _election_holders(conn)] == [str(second.pid)]
            )
        finally:
            second.terminate()
            second.wait(30)
    dcluster.run_cli("tasks", "start")
    assert tasks_runner.daemon_pid(dcluster.directory) is not None

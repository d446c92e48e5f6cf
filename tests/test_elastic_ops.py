"""Online move, split, rebalance and crash-resume on a real cluster of its own, under load."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from orchestrator.connections import connect, ingest_target
from orchestrator.elastic import balancer, jobs, move, split, verify
from orchestrator.elastic.context import Elastic, open_cluster
from orchestrator.exceptions import BuildSmartError
from orchestrator.fragments import Fragment, c_order
from tests.elastic_load import Load
from tests.harness import ClusterHandle, start_cluster, stop_cluster

# f1 [MIN, b) w1, f2 [b, m) w2, f3 [m, MAX) w1. Test buildings a00..a19 live in f1.
BUILDINGS = [f"a{i:02d}" for i in range(20)]


@pytest.fixture(scope="module")
def ecluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-elastic-", workers=2, split_points=["b", "m"])
    try:
        with handle.coordinator() as conn:
            conn.execute(
                "INSERT INTO public.readings SELECT 'a' || lpad((i % 20)::text, 2, '0'), 'seed', "
                "timestamptz '2024-06-01' + i * interval '1 minute', 1 FROM generate_series(1, 20000) i"
            )
        yield handle
    finally:
        stop_cluster(handle)


def _seeded(handle: ClusterHandle) -> Load:
    load = Load(handle, BUILDINGS)
    with handle.coordinator() as conn:
        for b, n, s in conn.execute(
            "SELECT building, count(*), sum(kwh) FROM public.readings WHERE building = ANY(%s) GROUP BY 1", (BUILDINGS,)
        ).fetchall():
            load.committed[b] = (int(n), float(s))
        load.started_rows = sum(n for n, _ in load.committed.values())
    return load


def _node_of(handle: ClusterHandle, fid: int) -> str:
    with open_cluster(handle.directory) as el:
        return el.fragment(fid).node


def test_move_under_load(ecluster: ClusterHandle) -> None:
    load = _seeded(ecluster).start()
    try:
        with open_cluster(ecluster.directory) as el:
            src = el.fragment(1).node
            dst = "w2" if src == "w1" else "w1"
            result = move.move_fragment(el, 1, dst)
    finally:
        load.stop()
    load.check()
    assert load.reads > 5
    assert result.rows > 20000 and result.pause_seconds < 2.0
    assert _node_of(ecluster, 1) == dst
    with ecluster.worker(src) as w:
        assert w.execute("SELECT to_regclass('bsdata.readings_f1')").fetchone() == (None,)
        assert w.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    with ecluster.worker(dst) as w:
        assert w.execute("SELECT count(*) FROM pg_subscription").fetchone() == (0,)


def test_split_under_load(ecluster: ClusterHandle) -> None:
    load = _seeded(ecluster).start()
    try:
        with open_cluster(ecluster.directory) as el:
            result = split.split_fragment(el, 1, "a10")
            frags = {f.fragment_id: f for f in el.fragments()}
    finally:
        load.stop()
    load.check()
    new = frags[result.new_fragment_id]
    assert (frags[1].range_to, new.range_from, new.range_to) == ("a10", "a10", "b")
    with ecluster.coordinator() as conn:
        per_part = dict(
            conn.execute(
                "SELECT tableoid::regclass::text, count(*) FROM public.readings WHERE building LIKE 'a%' GROUP BY 1"
            ).fetchall()
        )
        assert set(per_part) == {"bsdata.readings_f1", f"bsdata.{new.shard_name}"}
    with ecluster.worker(frags[1].node) as w:
        assert w.execute("SELECT count(*) FROM bsdata.readings_f1 WHERE building >= 'a10'").fetchone() == (0,)
        assert w.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'bs_split_mirror'").fetchone() == (0,)
        assert w.execute("SELECT to_regclass('bsdata.readings_f1_lower')").fetchone() == (None,)


def test_rebalance_under_load(ecluster: ClusterHandle) -> None:
    with open_cluster(ecluster.directory) as el:
        # Put every fragment on w1, then ask for balance.
        for f in el.fragments():
            if f.node != "w1":
                move.move_fragment(el, f.fragment_id, "w1")
    load = _seeded(ecluster).start()
    try:
        with open_cluster(ecluster.directory) as el:
            steps = balancer.plan(el, 0.5)
            assert steps, "everything on w1 must need a plan"
            done = balancer.run(el, 0.5)
            after = balancer.observe_load(el)
    finally:
        load.stop()
    load.check()
    assert done >= 1
    assert {f.node for f in after.fragments} == {"w1", "w2"}


def _job_step(handle: ClusterHandle, fid: int) -> str | None:
    with handle.coordinator() as conn:
        row = conn.execute(
            "SELECT step FROM buildsmart.jobs WHERE kind = 'move' AND state = 'running' AND (args->>'fragment_id')::int = %s",
            (fid,),
        ).fetchone()
    return None if row is None else str(row[0])


@pytest.mark.parametrize("kill_at", ["subscribed", "target_created"])
def test_kill_move_and_resume(ecluster: ClusterHandle, kill_at: str) -> None:
    fid = 2
    src = _node_of(ecluster, fid)
    dst = "w1" if src == "w2" else "w2"
    load = _seeded(ecluster).start()
    try:
        cmd = [sys.executable, "-m", "orchestrator", "fragment", "move", str(fid), dst, "--dir", str(ecluster.directory)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _job_step(ecluster, fid) != kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        resumed = ecluster.run_cli("fragment", "move", str(fid), dst)
        assert "moved" in resumed.stderr + resumed.stdout
    finally:
        load.stop()
    load.check()
    assert _node_of(ecluster, fid) == dst
    with ecluster.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM buildsmart.jobs WHERE state = 'running'").fetchone() == (0,)
    for node in ("w1", "w2"):
        with ecluster.worker(node) as w:
            assert w.execute("SELECT count(*) FROM pg_subscription").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


# Buildings e00..e19 live in f2 [b, m); preloaded so a split's copy and cleanup take a while.
E_BUILDINGS = [f"e{i:02d}" for i in range(20)]


def _preload_e(handle: ClusterHandle) -> None:
    with handle.coordinator() as conn:
        row = conn.execute("SELECT count(*) FROM public.readings WHERE building LIKE 'e%'").fetchone()
        if row is not None and row[0] > 0:
            return
        conn.execute(
            "INSERT INTO public.readings SELECT 'e' || lpad((i % 20)::text, 2, '0'), 'bulk' || (i % 5), "
            "timestamptz '2024-06-01' + i * interval '1 minute', i % 97 FROM generate_series(1, 150000) i"
        )


def _kill_at(handle: ClusterHandle, args: list[str], kind: str, steps: tuple[str, ...]) -> str:
    """Run ``buildsmart ARGS``, SIGKILL it as soon as its newest open ``kind`` job reaches one of
    ``steps``; returns the step it was killed at."""
    cmd = [sys.executable, "-m", "orchestrator", *args, "--dir", str(handle.directory)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    step = None
    with handle.coordinator() as conn:
        while proc.poll() is None and time.monotonic() < deadline:
            row = conn.execute(
                "SELECT step FROM buildsmart.jobs WHERE kind = %s AND state = 'running' ORDER BY job_id DESC LIMIT 1",
                (kind,),
            ).fetchone()
            if row is not None and row[0] in steps:
                step = str(row[0])
                break
            time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    assert step is not None, f"{args} never reached {steps} (rc {proc.returncode}):\n{out.decode()}\n{err.decode()}"
    return step


def _check_consistent(handle: ClusterHandle) -> None:
    """Catalog, coordinator partitions and worker tables agree; no job open, no move or split artefact left."""
    with open_cluster(handle.directory) as el:
        frags = sorted(el.fragments(), key=lambda f: (f.range_from is not None, f.range_from or ""))
        coord = el.coord
        assert coord.execute("SELECT count(*) FROM buildsmart.jobs WHERE state IN ('scheduled', 'running')").fetchone() == (0,)
        assert coord.execute(
            "SELECT count(*) FROM buildsmart.fragments f WHERE (SELECT count(*) FROM buildsmart.placements p "
            "WHERE p.fragment_id = f.fragment_id AND p.state = 'active') <> 1"
        ).fetchone() == (0,)
        # Ranges tile the key space: MINVALUE .. MAXVALUE without gap or overlap.
        assert frags[0].range_from is None and frags[-1].range_to is None
        assert all(a.range_to == b.range_from for a, b in itertools.pairwise(frags))
        partitions = dict(
            coord.execute(
                "SELECT c.oid::regclass::text, s.srvname || ':' || coalesce((SELECT split_part(o, '=', 2) "
                "FROM unnest(ft.ftoptions) o WHERE o LIKE 'table_name=%%'), '') FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_foreign_table ft ON ft.ftrelid = c.oid "
                "JOIN pg_foreign_server s ON s.oid = ft.ftserver WHERE i.inhparent = 'public.readings'::regclass"
            ).fetchall()
        )
        servers = dict(coord.execute("SELECT name, server_name FROM buildsmart.nodes WHERE role = 'worker'").fetchall())
        assert partitions == {f"bsdata.{f.shard_name}": f"{servers[f.node]}:{f.shard_name}" for f in frags}
        for node in servers:
            w = el.nodes.get(node)
            tables = {
                r[0]
                for r in w.execute(
                    "SELECT relname FROM pg_class WHERE relnamespace = 'bsdata'::regnamespace "
                    "AND relkind = 'p' AND NOT relispartition"
                ).fetchall()
            }
            assert tables == {f.shard_name for f in frags if f.node == node}, node
            for what in ("pg_subscription", "pg_publication", "pg_replication_slots"):
                assert w.execute(f"SELECT count(*) FROM {what}").fetchone() == (0,), (node, what)
            assert w.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'bs_split_mirror'").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_views WHERE schemaname = 'bsdata'").fetchone() == (0,)


def _fragment_holding(handle: ClusterHandle, building: str) -> int:
    with open_cluster(handle.directory) as el:
        return next(f.fragment_id for f in el.fragments() if f.holds(building))


@pytest.mark.parametrize(("at", "kill_at"), [("e10", ("mirroring",)), ("e05", ("switched",))])
def test_kill_split_and_resume(ecluster: ClusterHandle, at: str, kill_at: tuple[str, ...]) -> None:
    _preload_e(ecluster)
    fid = _fragment_holding(ecluster, at)
    load = Load(ecluster, E_BUILDINGS)
    with ecluster.coordinator() as conn:
        for b, n, s in conn.execute(
            "SELECT building, count(*), sum(kwh) FROM public.readings WHERE building = ANY(%s) GROUP BY 1", (E_BUILDINGS,)
        ).fetchall():
            load.committed[b] = (int(n), float(s))
        load.started_rows = sum(n for n, _ in load.committed.values())
    load.start()
    try:
        step = _kill_at(ecluster, ["fragment", "split", str(fid), "--at", at], "split", kill_at)
        resumed = ecluster.run_cli("fragment", "split", str(fid))
        assert "split" in resumed.stdout + resumed.stderr
    finally:
        load.stop()
    load.check()
    _check_consistent(ecluster)
    with open_cluster(ecluster.directory) as el:
        assert any(f.range_from == at for f in el.fragments()), f"killed at {step}, the resumed split did not switch"
    with ecluster.coordinator() as conn:
        job = conn.execute(
            "SELECT state, detail ? 'rows' FROM buildsmart.jobs WHERE kind = 'split' AND args->>'at' = %s", (at,)
        ).fetchall()
    assert job == [("done", True)]


def test_kill_rebalance_and_rerun(ecluster: ClusterHandle) -> None:
    _preload_e(ecluster)
    with open_cluster(ecluster.directory) as el:
        for f in el.fragments():  # everything on w1: the rebalance has work to do
            if f.node != "w1":
                move.move_fragment(el, f.fragment_id, "w1")
    load = _seeded(ecluster).start()
    try:
        _kill_at(ecluster, ["rebalance", "--tolerance", "0.2"], "move", ("target_created", "subscribed"))
        with ecluster.coordinator() as conn:
            parent = conn.execute(
                "SELECT job_id FROM buildsmart.jobs WHERE kind = 'rebalance_run' AND state = 'running'"
            ).fetchone()
        assert parent is not None
        rerun = ecluster.run_cli("rebalance", "--tolerance", "0.2")
        assert "resuming interrupted move" in rerun.stdout + rerun.stderr
    finally:
        load.stop()
    load.check()
    _check_consistent(ecluster)
    with open_cluster(ecluster.directory) as el:
        assert {f.node for f in el.fragments()} == {"w1", "w2"}
        assert balancer.plan(el, 0.2) == []
        assert el.coord.execute("SELECT state FROM buildsmart.jobs WHERE job_id = %s", parent).fetchone() == ("cancelled",)


def test_switch_checks_everything_when_time_partitions_change(ecluster: ClusterHandle) -> None:
    """A time partition created on the source between the pre-check and the pause: the switch
    must fall back to verifying the whole fragment (and still move every row)."""
    _preload_e(ecluster)
    fid = _fragment_holding(ecluster, "e00")
    with open_cluster(ecluster.directory) as el:
        frag = el.fragment(fid)
        target = "w1" if frag.node == "w2" else "w2"
        job = jobs.create(el.coord, "move", {"fragment_id": fid, "source": frag.node, "target": target})
        move._create_target(el, frag, target)
        move._subscribe(el, frag, target)
        move._wait_initial_sync(el, frag, target)
        changes, pre = move._precheck(el, frag, target)
        with ecluster.coordinator() as conn:  # through the replace trigger: lands in the new partition
            el.nodes.get(frag.node).execute(
                "SELECT buildsmart.ensure_time_partitions(%s::regclass, '1 month', '2031-03-01', '2031-03-01')",
                (f"bsdata.{frag.shard_name}",),
            )
            conn.execute(
                "INSERT INTO public.readings SELECT 'e01', 'late', timestamptz '2031-03-01' + g * interval '1 h', g "
                "FROM generate_series(1, 100) g"
            )
            want = conn.execute(
                "SELECT count(*) FROM public.readings WHERE building >= %s AND building < %s", (frag.range_from, frag.range_to)
            ).fetchone()
        assert (
            verify.recheck_units(
                pre,
                verify.layout(el.nodes.get(frag.node), frag.shard_name),
                verify.layout(el.nodes.get(target), frag.shard_name),
                set(),
                False,
            )
            is None
        )
        rows, _ = move._switch(el, frag, target, job.job_id, changes, pre)
        move._cleanup(el, fid, frag.node, target)
        jobs.finish(el.coord, job.job_id, rows=rows)
    assert want is not None and rows == want[0]
    _check_consistent(ecluster)
    with ecluster.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM public.readings WHERE meter = 'late'").fetchone() == (100,)


def test_citus_functions_through_sql(ecluster: ClusterHandle) -> None:
    topo = ecluster.topology
    with ecluster.coordinator() as conn:
        fid, node, port = conn.execute(
            "SELECT shardid, node_name, nodeport FROM citus_shards ORDER BY shardid LIMIT 1"
        ).fetchone()  # type: ignore[misc]
        dst = "w1" if node == "w2" else "w2"
        dst_port = topo.group(dst).members[0].port
        job = conn.execute(
            "SELECT citus_move_shard_placement(%s, '127.0.0.1', %s, '127.0.0.1', %s)", (fid, port, dst_port)
        ).fetchone()[0]  # type: ignore[index]
        assert conn.execute(
            "SELECT create_time_partitions('public.readings', '1 month', now() + interval '6 months')"
        ).fetchone() == (True,)
        conn.execute("CALL drop_old_time_partitions('public.readings', now() - interval '100 years')")
        rebalance_job = conn.execute("SELECT citus_rebalance_start()").fetchone()[0]  # type: ignore[index]
        assert conn.execute("SELECT count(*) FROM citus_rebalance_status() WHERE state = 'scheduled'").fetchone()[0] >= 4  # type: ignore[index]
    ecluster.run_cli("jobs", "run")
    with ecluster.coordinator() as conn:
        states = dict(conn.execute("SELECT job_id, state FROM citus_rebalance_status()").fetchall())
        assert states[job] == "done" and states[rebalance_job] == "done"
        # the move ran (the rebalance queued after it may have moved the shard again)
        moved = conn.execute("SELECT count(*) FROM buildsmart.jobs WHERE parent_id = %s AND kind = 'move'", (job,)).fetchone()
        assert moved == (1,)
        assert conn.execute(
            "SELECT count(*) FROM buildsmart.jobs WHERE state IN ('scheduled', 'running', 'failed')"
        ).fetchone() == (0,)
        assert conn.execute("SELECT shard_count FROM citus_tables").fetchone()[0] >= 3  # type: ignore[index]
    with ecluster.worker(_node_of(ecluster, fid)) as w:
        # six months ahead exist now on every fragment
        assert w.execute("SELECT count(*) FROM pg_class WHERE relname LIKE %s", (f"readings_f{fid}_p%",)).fetchone()[0] >= 6  # type: ignore[index]


def test_retention_dry_run_then_apply(ecluster: ClusterHandle) -> None:
    from orchestrator.elastic import maintenance

    with open_cluster(ecluster.directory) as el:
        for f in el.fragments():  # what ingest does: partitions for the months it loads (rows leave DEFAULT)
            el.nodes.get(f.node).execute(
                "SELECT buildsmart.ensure_time_partitions(%s::regclass, '1 month', '2024-06-01', '2024-06-30')",
                (f"bsdata.{f.shard_name}",),
            )
        expired = maintenance.plan_retention(el, "6 months")  # the seed rows of 2024-06 are older
        assert any(p.upper_bound.year == 2024 for p in expired)
        dry = ecluster.run_cli("retention", "--older-than", "6 months")
        assert "would drop" in dry.stdout
        with ecluster.coordinator() as conn:
            before = conn.execute("SELECT count(*) FROM public.readings WHERE ts < '2024-07-01'").fetchone()
            assert before is not None and before[0] > 0
        assert maintenance.apply_retention(el, [p for p in expired if p.upper_bound.year == 2024]) >= 1
    with ecluster.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM public.readings WHERE ts < '2024-07-01'").fetchone() == (0,)


def _inside(f: Fragment) -> str | None:
    """A split point strictly inside a building-range fragment (None for a time range)."""
    if f.time_group is not None:
        return None
    key = (f.range_from or "") + "5"
    if f.range_to is not None and c_order(key) >= c_order(f.range_to):
        return None
    return key


def _table_rows(handle: ClusterHandle, node: str, shard: str) -> int | None:
    with handle.worker(node) as w:
        if w.execute("SELECT to_regclass(%s)", (f"bsdata.{shard}",)).fetchone() == (None,):
            return None
        row = w.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("bsdata", shard))).fetchone()
        return None if row is None else int(row[0])


def test_concurrent_splits_and_a_move_on_one_node(ecluster: ClusterHandle) -> None:
    """Two splits on one node and a move onto it at once: distinct new ids (a sequence, not
    max + 1), every row kept, every fragment's table where the catalog says."""
    with open_cluster(ecluster.directory) as el:
        splittable = [f for f in el.fragments() if _inside(f) is not None]
        assert len(splittable) >= 2, "the cluster needs two building-range fragments"
        node = "w1"
        for f in splittable[:2]:
            if f.node != node:
                move.move_fragment(el, f.fragment_id, node)
        a, b = (el.fragment(f.fragment_id) for f in splittable[:2])
        others = [f for f in el.fragments() if f.fragment_id not in (a.fragment_id, b.fragment_id)]
        if not any(f.node != node for f in others):
            move.move_fragment(el, others[0].fragment_id, "w2")
        c = next(el.fragment(f.fragment_id) for f in others if el.fragment(f.fragment_id).node != node)
        known = {f.fragment_id for f in el.fragments()}
    buildings = []
    for f in (a, b):
        key = _inside(f)
        assert key is not None
        buildings += [(f.range_from or "") + "1", key, key + "z"]
    with ecluster.coordinator() as conn:
        conn.execute(
            "INSERT INTO public.readings SELECT b, 'conc', timestamptz '2025-02-01' + i * interval '1 hour', i "
            "FROM unnest(%s::text[]) b, generate_series(1, 200) i",
            (buildings,),
        )
        before = conn.execute("SELECT count(*), sum(kwh) FROM public.readings").fetchone()

    barrier = threading.Barrier(3)
    results: dict[str, object] = {}

    def run(name: str, op: Callable[[Elastic], object]) -> None:
        try:
            with open_cluster(ecluster.directory) as el:
                barrier.wait(30)
                results[name] = op(el)
        except Exception as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("split-a", lambda el: split.split_fragment(el, a.fragment_id, _inside(a)))),
        threading.Thread(target=run, args=("split-b", lambda el: split.split_fragment(el, b.fragment_id, _inside(b)))),
        threading.Thread(target=run, args=("move-c", lambda el: move.move_fragment(el, c.fragment_id, node))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    failed = {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert not failed and len(results) == 3, f"concurrent operations failed: {failed or results}"
    new_ids = [r.new_fragment_id for k, r in results.items() if k.startswith("split")]  # type: ignore[attr-defined]
    assert len(set(new_ids)) == 2 and not set(new_ids) & known, f"new fragment ids {new_ids} (existing {sorted(known)})"
    with ecluster.coordinator() as conn:
        assert conn.execute("SELECT count(*), sum(kwh) FROM public.readings").fetchone() == before
    with open_cluster(ecluster.directory) as el:
        for f in el.fragments():
            if f.time_group is None:
                assert _table_rows(ecluster, f.node, f.shard_name) is not None, f"{f.shard_name} missing on {f.node}"
    ecluster.run_cli("check")


def test_failed_split_never_drops_another_fragment(ecluster: ClusterHandle) -> None:
    """A split whose new id names a live fragment of its node (what two splits taking max + 1 at
    once made) fails, and its rollback leaves that fragment and its rows alone."""
    with open_cluster(ecluster.directory) as el:
        frags = el.fragments()
        victim, target = next(
            (v, t)
            for v in frags
            for t in frags
            if v.time_group is None and v.fragment_id != t.fragment_id and v.node == t.node and _inside(t) is not None
        )
        rows = _table_rows(ecluster, victim.node, victim.shard_name)
        assert rows is not None
        args = {"fragment_id": target.fragment_id, "at": _inside(target), "node": target.node}
        job = jobs.create(el.coord, "split", {**args, "new_fragment_id": victim.fragment_id})
        with pytest.raises(BuildSmartError):
            split.run_split_job(el, job)
        assert jobs.get(el.coord, job.job_id).state == "failed"
    assert _table_rows(ecluster, victim.node, victim.shard_name) == rows, "the failed split dropped a live fragment"
    with ecluster.worker(target.node) as w:
        assert w.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'bs_split_mirror'").fetchone() == (0,)
    ecluster.run_cli("check")


def test_direct_writes_to_the_source_during_a_move_are_not_lost(ecluster: ClusterHandle) -> None:
    """A writer on the source worker itself (a loader whose gate session died, a client there),
    writing all through a move: every write it was told committed is in the cluster afterwards;
    after the switch its writes fail instead of landing in the old table."""
    with open_cluster(ecluster.directory) as el:
        frag = next(f for f in el.fragments() if _inside(f) is not None)
        key = (frag.range_from or "") + "7direct"
        src, dst = frag.node, ("w2" if frag.node == "w1" else "w1")
        target = ingest_target(el.topo.group(src), el.creds)
    acked: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def write() -> None:
        conn: psycopg.Connection | None = None
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if conn is None or conn.closed:
                    conn = connect(target, "test-direct-writer", autocommit=True)
                conn.execute(
                    sql.SQL("INSERT INTO {} (building, meter, ts, kwh) VALUES (%s, 'direct', %s, %s)").format(
                        sql.Identifier("bsdata", frag.shard_name)
                    ),
                    (key, datetime(2025, 3, 1, tzinfo=UTC) + timedelta(seconds=i), i),
                )
                acked.append(i)
            except (psycopg.Error, BuildSmartError) as exc:
                refused.append(str(exc).splitlines()[0])
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        with open_cluster(ecluster.directory) as el:
            move.move_fragment(el, frag.fragment_id, dst)
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join(30)
    with ecluster.coordinator() as conn:
        stored = {int(r[0]) for r in conn.execute("SELECT kwh FROM readings WHERE building = %s AND meter = 'direct'", (key,))}
    lost = sorted(set(acked) - stored)
    print(f"direct writer: {len(acked)} acknowledged, {len(refused)} refused ({set(refused)}), lost {len(lost)}")
    assert len(acked) > 20 and refused, "the writer must have written before and been refused after the switch"
    assert not lost, f"{len(lost)} acknowledged writes to the source were lost: {lost[:10]}"
    assert _node_of(ecluster, frag.fragment_id) == dst

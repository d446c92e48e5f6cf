"""Online move, split, rebalance and crash-resume on a real cluster of its own, under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from orchestrator.elastic import balancer, move, split
from orchestrator.elastic.context import open_cluster
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

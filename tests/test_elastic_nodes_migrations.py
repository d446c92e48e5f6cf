"""Alembic migrations across every node (2PC), and node add/remove/drain, on a cluster of their own."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator.elastic import migrate, move, nodes
from orchestrator.elastic.context import open_cluster
from orchestrator.exceptions import BuildSmartError, ClusterStateError
from tests.harness import REPO, ClusterHandle, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def mcluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-elastic-m-", workers=2, split_points=["b", "m"])
    try:
        with handle.coordinator() as conn:
            conn.execute(
                "INSERT INTO public.readings SELECT chr(97 + i % 26) || 'x', 'm', "
                "timestamptz '2024-06-01' + i * interval '1 h', 1 "
                "FROM generate_series(1, 3000) i"
            )
        yield handle
    finally:
        stop_cluster(handle)


def _has_kw(conn: psycopg.Connection, rel: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'kw' AND NOT attisdropped", (rel,)
    ).fetchone()
    return bool(row and row[0])


def _schema_state(handle: ClusterHandle) -> dict[str, object]:
    state: dict[str, object] = {}
    with handle.coordinator() as c:
        state["coordinator"] = _has_kw(c, "public.readings")
        frags = c.execute(
            "SELECT f.shard_name, p.node_name FROM buildsmart.fragments f JOIN buildsmart.placements p USING (fragment_id)"
        ).fetchall()
        v = c.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        state["version"] = c.execute("SELECT version_num FROM public.alembic_version").fetchone() if v and v[0] else None
    for shard, node in frags:
        with handle.worker(node) as w:
            idx = w.execute("SELECT to_regclass(%s) IS NOT NULL", (f"bsdata.{shard}_meter_ts_idx",)).fetchone()
            state[shard] = (_has_kw(w, f"bsdata.{shard}"), bool(idx and idx[0]))
    return state


def test_migration_up_down_everywhere(mcluster: ClusterHandle) -> None:
    migrate.run(mcluster.directory, "head")
    up = _schema_state(mcluster)
    assert up["coordinator"] is True and up["version"] == ("0002",)
    assert all(v == (True, True) for k, v in up.items() if k.startswith("readings_f"))
    with mcluster.coordinator(admin=False) as c:  # the new column works end to end
        c.execute("INSERT INTO public.readings (building, meter, ts, kwh, kw) VALUES ('cz', 'm', now(), 2, 8)")
        assert c.execute("SELECT kw FROM public.readings WHERE building = 'cz'").fetchone() == (8.0,)
        c.execute("DELETE FROM public.readings WHERE building = 'cz'")
    # plain `alembic` from the repository root works too
    env = {"BUILDSMART_DIR": str(mcluster.directory), "PATH": "/opt/bsdb-venv/bin:/usr/bin:/bin"}
    proc = subprocess.run(["/opt/bsdb-venv/bin/alembic", "downgrade", "base"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    down = _schema_state(mcluster)
    assert down["coordinator"] is False and down["version"] is None
    assert all(v == (False, False) for k, v in down.items() if k.startswith("readings_f"))


def test_migration_failing_on_one_node_changes_nothing(mcluster: ClusterHandle) -> None:
    before = _schema_state(mcluster)
    with mcluster.worker("w2") as w:  # a conflicting column on one fragment of one node
        w.execute("ALTER TABLE bsdata.readings_f2 ADD COLUMN kw double precision")
    try:
        with pytest.raises(BuildSmartError):
            migrate.run(mcluster.directory, "head")
        after = _schema_state(mcluster)
        after["readings_f2"] = (False, after["readings_f2"][1])  # type: ignore[index]
        assert after == before
        for node in ("coordinator", "w1", "w2"):
            with mcluster.coordinator() if node == "coordinator" else mcluster.worker(node) as conn:
                assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    finally:
        with mcluster.worker("w2") as w:
            w.execute("ALTER TABLE bsdata.readings_f2 DROP COLUMN kw")


def test_node_add_rebalance_then_remove(mcluster: ClusterHandle) -> None:
    migrate.run(mcluster.directory, "0001")  # new fragments must get the kw column
    with mcluster.coordinator() as c:
        total = c.execute("SELECT count(*), sum(kwh) FROM public.readings").fetchone()
    with open_cluster(mcluster.directory) as el:
        group = nodes.add_node(el, "w3")
        assert group.name == "w3"
        move.move_fragment(el, 3, "w3")
        with pytest.raises(ClusterStateError):
            nodes.remove_node(el, "w3")  # holds a fragment, no --drain
    with mcluster.worker("w3") as w:
        assert _has_kw(w, "bsdata.readings_f3")
    with open_cluster(mcluster.directory) as el:
        nodes.remove_node(el, "w3", drain=True)
        assert {f.node for f in el.fragments()} <= {"w1", "w2"}
    with open_cluster(mcluster.directory) as el:
        nodes.add_node(el, "w4")
        nodes.remove_node(el, "w4")  # empty: no drain needed
        assert [g.name for g in el.topo.workers] == ["w1", "w2"]
    with mcluster.coordinator() as c:
        assert c.execute("SELECT count(*), sum(kwh) FROM public.readings").fetchone() == total
        assert c.execute("SELECT count(*) FROM buildsmart.nodes").fetchone() == (3,)
    migrate.run(mcluster.directory, "base", downgrade=True)


@pytest.mark.parametrize(
    ("fault", "applied"),
    [
        ("migrate:workers-prepared", False),  # killed between the workers' PREPARE and the coordinator's
        ("migrate:decided", True),  # killed after the decision, before any COMMIT PREPARED
        ("migrate:coordinator-committed", True),  # killed between the coordinator's commit and the workers'
    ],
)
def test_killed_migration_is_settled_all_or_none(mcluster: ClusterHandle, fault: str, applied: bool) -> None:
    """kill -9 of the migrating process at each point of the two-phase commit: the next migrate
    settles every node the same way (from the decision recorded on the coordinator) and goes on."""
    migrate.run(mcluster.directory, "base", downgrade=True)
    before = _schema_state(mcluster)
    env = {
        "BUILDSMART_DIR": str(mcluster.directory),
        "PATH": "/opt/bsdb-venv/bin:/usr/bin:/bin",
        migrate.FAULT_ENV: fault,
    }
    proc = subprocess.run(
        ["/opt/bsdb-venv/bin/alembic", "upgrade", "0001"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 137, proc.stderr
    left = 0
    for node in ("coordinator", "w1", "w2"):
        with mcluster.coordinator() if node == "coordinator" else mcluster.worker(node) as conn:
            row = conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()
            left += int(row[0]) if row else 0
    assert left > 0, "the kill must leave prepared transactions behind"
    # the next run settles what was left (all committed or all rolled back), then migrates
    with open_cluster(mcluster.directory) as el:
        from orchestrator.connections import superuser_target

        coord = superuser_target(el.topo.coordinator, el.creds)
        workers = {w.name: superuser_target(w, el.creds) for w in el.topo.workers}
        settled = migrate.recover(coord, workers)
    assert settled >= 1
    state = _schema_state(mcluster)
    kw_everywhere = {
        v if isinstance(v, bool) else v[0] for k, v in state.items() if k == "coordinator" or k.startswith("readings_f")
    }
    assert kw_everywhere == {applied}, state
    assert state["version"] == (("0001",) if applied else before["version"])
    for node in ("coordinator", "w1", "w2"):
        with mcluster.coordinator() if node == "coordinator" else mcluster.worker(node) as conn:
            assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)
    with mcluster.coordinator() as c:
        assert c.execute("SELECT count(*) FROM buildsmart.twophase_decisions").fetchone() == (0,)
    migrate.run(mcluster.directory, "head")
    migrate.run(mcluster.directory, "base", downgrade=True)

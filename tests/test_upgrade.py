"""`buildsmart upgrade` from release 0.1: a cluster made as 0.1 made it (the frozen
buildsmart--0.1.sql, a PL/pgSQL replace trigger per fragment, no C module in its sessions), loaded
with readings, upgraded in place; nothing lost, the new parts at work on the old data. Also a
kill -9 at each commit point of the upgrade, settled all or none by the next run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator import EXTENSION_VERSION, topology
from orchestrator.catalog import load_fragments
from orchestrator.upgrade import FAULT_ENV
from tests.harness import ClusterHandle, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def ucluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-upg-", workers=2, split_points=["m"], replicas=0)
    try:
        yield handle
    finally:
        stop_cluster(handle)


def _make_release_0_1(handle: ClusterHandle) -> None:
    """Take the cluster back to what release 0.1 made."""
    with handle.coordinator() as conn:
        frags = load_fragments(conn)
        conn.execute("ALTER DATABASE buildsmart RESET session_preload_libraries")
    for f in frags:
        with handle.worker(f.node) as w:
            w.execute(f"DROP TRIGGER readings_replace ON bsdata.{f.shard_name}")
            w.execute(
                f"CREATE OR REPLACE FUNCTION bsdata.{f.shard_name}_replace() RETURNS trigger LANGUAGE plpgsql "
                "SET plan_cache_mode = force_generic_plan AS $$ BEGIN DELETE FROM "
                f"bsdata.{f.shard_name} WHERE building = NEW.building AND meter = NEW.meter AND ts = NEW.ts; "
                "RETURN NEW; END $$"
            )
            w.execute(
                f"CREATE TRIGGER readings_replace BEFORE INSERT ON bsdata.{f.shard_name} "
                f"FOR EACH ROW EXECUTE FUNCTION bsdata.{f.shard_name}_replace()"
            )
    for node in ("coordinator", *(w.name for w in handle.topology.workers)):
        with handle.coordinator() if node == "coordinator" else handle.worker(node) as conn:
            conn.execute("ALTER EXTENSION buildsmart UPDATE TO '0.1'")
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'buildsmart'").fetchone() == ("0.1",)


def _state(handle: ClusterHandle) -> dict[str, object]:
    out: dict[str, object] = {}
    with handle.coordinator() as conn:
        out["rows"] = conn.execute("SELECT building, count(*), sum(kwh) FROM readings GROUP BY 1 ORDER BY 1").fetchall()
        out["versions"] = {
            "coordinator": conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'buildsmart'").fetchone()
        }
        frags = load_fragments(conn)
    triggers = set()
    for w in handle.topology.workers:
        with handle.worker(w.name) as conn:
            out["versions"][w.name] = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'buildsmart'").fetchone()  # type: ignore[index]
            for f in frags:
                if f.node == w.name:
                    triggers |= {
                        r[0]
                        for r in conn.execute(
                            "SELECT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
                            "WHERE t.tgrelid = %s::regclass AND t.tgname = 'readings_replace'",
                            (f"bsdata.{f.shard_name}",),
                        )
                    }
    out["triggers"] = triggers
    return out


def _upgrade(handle: ClusterHandle, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if fault:
        import os

        env = {**os.environ, FAULT_ENV: fault}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "upgrade", "--dir", str(handle.directory)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_upgrade_from_0_1_keeps_data_and_turns_the_new_parts_on(ucluster: ClusterHandle) -> None:
    _make_release_0_1(ucluster)
    with ucluster.coordinator(admin=False) as conn:
        conn.execute(
            "INSERT INTO readings SELECT b, 'el', timestamptz '2024-01-01' + h * interval '1 hour', h "
            "FROM generate_series(0, 499) h, (VALUES ('alpha'), ('zulu')) v(b)"
        )
        conn.execute("INSERT INTO readings VALUES ('alpha', 'el', '2024-01-01 00:00+00', 42)")  # the 0.1 trigger replaces
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT building, sum(kwh) FROM readings GROUP BY 1"))
        assert "BuildSmart" not in plan  # 0.1 sessions have no distributed planner
    before = _state(ucluster)
    assert before["triggers"] == {"readings_f1_replace", "readings_f2_replace"}

    proc = _upgrade(ucluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = _state(ucluster)
    assert after["rows"] == before["rows"]
    assert set(after["versions"].values()) == {(EXTENSION_VERSION,)}  # type: ignore[attr-defined]
    assert after["triggers"] == {"replace_existing"}
    with ucluster.coordinator(admin=False) as conn:
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT building, sum(kwh) FROM readings GROUP BY 1"))
        assert "BuildSmart Distributed" in plan, plan
        conn.execute("INSERT INTO readings VALUES ('zulu', 'el', '2024-01-01 01:00+00', 7)")  # the C trigger replaces
        assert conn.execute("SELECT kwh FROM readings WHERE building = 'zulu' AND ts = '2024-01-01 01:00+00'").fetchone() == (
            7.0,
        )
        assert conn.execute("SELECT count(*) FROM readings").fetchone() == (1000,)
    # a second run has nothing to do
    again = _upgrade(ucluster)
    assert again.returncode == 0 and f"every node runs buildsmart {EXTENSION_VERSION}" in again.stderr + again.stdout


@pytest.mark.parametrize(
    ("fault", "committed"), [("upgrade:prepared-coordinator", False), ("upgrade:committed-coordinator", True)]
)
def test_killed_upgrade_is_settled_all_or_none(ucluster: ClusterHandle, fault: str, committed: bool) -> None:
    _make_release_0_1(ucluster)
    killed = _upgrade(ucluster, fault)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    with ucluster.coordinator() as conn:
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'buildsmart'").fetchone()
    assert version == ((EXTENSION_VERSION,) if committed else ("0.1",))
    done = _upgrade(ucluster)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "settled" in done.stderr + done.stdout
    state = _state(ucluster)
    assert set(state["versions"].values()) == {(EXTENSION_VERSION,)}  # type: ignore[attr-defined]
    for node in ("coordinator", *(w.name for w in topology.load(ucluster.directory).workers)):
        with ucluster.coordinator() if node == "coordinator" else ucluster.worker(node) as conn:
            assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone() == (0,)

"""Query plans on the coordinator: which queries run on the workers (the distributed planner of the
extension's C module), pruning to one fragment, time pruning on the worker, and PostgreSQL's own
plan through postgres_fdw when pushdown is off or not allowed."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from orchestrator.catalog import load_fragments
from orchestrator.ingest.loader import ingest
from tests.harness import ClusterHandle, write_csv


def explain(cluster: ClusterHandle, query: str, params: tuple[object, ...] = (), options: str = "VERBOSE, COSTS OFF") -> str:
    with cluster.coordinator(admin=False) as conn:
        rows = conn.execute(f"EXPLAIN ({options}) " + query, params or None).fetchall()
    return "\n".join(r[0] for r in rows)


@pytest.fixture
def loaded(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> str:
    rows = [
        (f"{p}{token}", "el", f"2023-{m:02d}-15 12:00:00+00", float(m)) for p in ("a", "b4", "c", "t", "z") for m in range(1, 13)
    ]
    ingest(main_cluster.directory, str(write_csv(tmp_path / "q.csv", rows)))
    return token


def test_one_building_scans_one_fragment(main_cluster: ClusterHandle, loaded: str) -> None:
    b = f"c{loaded}"
    literal = explain(main_cluster, f"SELECT * FROM readings WHERE building = '{b}'")
    # planning pruned the fragment list to one; EXPLAIN names the node and fragment it will read
    assert "Runs on: workers" in literal and "Fragments: 1 of 1 on 1 node(s)" in literal, literal
    assert "readings_f3" in literal
    # a bound parameter (psycopg sends it separately): the custom plan prunes with its value
    bound = explain(main_cluster, "SELECT * FROM readings WHERE building = %s", (b,))
    assert "Fragments: 1 of 1 on 1 node(s)" in bound and "readings_f3" in bound, bound
    analyzed = explain(main_cluster, "SELECT * FROM readings WHERE building = %s", (b,), "ANALYZE, VERBOSE, COSTS OFF")
    assert "Fragments: 1 of 1 on 1 node(s)" in analyzed and "rows=12" in analyzed, analyzed


def test_prepared_statement_prunes_when_it_runs(main_cluster: ClusterHandle, loaded: str) -> None:
    """A generic plan (prepared statement) keeps every fragment and prunes with each execution's value."""
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("PREPARE one(text) AS SELECT sum(kwh) FROM readings WHERE building = $1")
        # the generic plan keeps all five fragments; EXPLAIN EXECUTE prunes with the bound value
        generic = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) EXECUTE one('x')").fetchall())
        assert "Fragments: 1 of 5 on 1 node(s)" in generic, generic
        # without a value (EXPLAIN of the generic plan itself) it says pruning happens at run time
        conn.execute("DEALLOCATE one")
        unbound = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN (GENERIC_PLAN, COSTS OFF) SELECT sum(kwh) FROM readings WHERE building = $1"
            ).fetchall()
        )
        assert "5 candidate(s), pruned on building when the plan runs" in unbound, unbound
        conn.execute("PREPARE one(text) AS SELECT sum(kwh) FROM readings WHERE building = $1")
        run = "\n".join(r[0] for r in conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE one('t{loaded}')").fetchall())
        assert "Fragments: 1 of 5" in run, run
        assert conn.execute(f"EXECUTE one('t{loaded}')").fetchone() == (78.0,)


def test_time_range_prunes_time_partitions_on_the_worker(main_cluster: ClusterHandle, loaded: str) -> None:
    b = f"c{loaded}"
    plan = explain(
        main_cluster, f"SELECT sum(kwh) FROM readings WHERE building = '{b}' AND ts >= '2023-03-01' AND ts < '2023-04-01'"
    )
    remote = re.search(r"Remote SQL \(\w+\): (.*)", plan)
    assert remote and "ts >=" in remote.group(1) and "ts <" in remote.group(1), plan
    with main_cluster.coordinator() as conn:
        frag = next(f for f in load_fragments(conn) if f.holds(b))
    with main_cluster.worker(frag.node) as conn:
        worker_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + remote.group(1)).fetchall())
        partitions = conn.execute(
            "SELECT count(*) FROM pg_partition_tree(%s::regclass) WHERE isleaf", (f"bsdata.{frag.shard_name}",)
        ).fetchone()
    assert partitions is not None and partitions[0] > 3
    scanned = re.findall(r"on (readings_f\d+_\w+)", worker_plan)
    assert scanned == [f"{frag.shard_name}_p20230301"], worker_plan


def test_group_by_building_runs_on_every_worker_at_once(main_cluster: ClusterHandle, loaded: str) -> None:
    plan = explain(
        main_cluster,
        f"SELECT building, meter, sum(kwh), count(*) FROM readings WHERE building LIKE '%{loaded}%' GROUP BY building, meter",
        options="ANALYZE, VERBOSE, COSTS OFF",
    )
    assert "Runs on: workers" in plan and "Shape: grouped by building" in plan, plan
    assert "Fragments: 5 of 5 on 2 node(s)" in plan, plan
    nodes = re.findall(r"Remote SQL \((\w+)\): (.*)", plan)
    assert len(nodes) == 2 and all("GROUP BY" in sql for _, sql in nodes), plan
    # the two fragments of one node go in one statement
    assert any("UNION ALL" in sql for _, sql in nodes), plan


@pytest.mark.parametrize(
    "bucket",
    [
        "date_trunc('month', ts AT TIME ZONE 'UTC')",
        "date_trunc('day', ts AT TIME ZONE 'Europe/London')",
        "date_trunc('day', ts)",
        "date_bin('15 minutes', ts, '2000-01-01')",
        "extract(month FROM ts AT TIME ZONE 'America/New_York')",
        "buildsmart.time_bucket('1 day', ts, 'Europe/London')",
        "buildsmart.month_bucket(ts)",
    ],
)
def test_time_buckets_run_on_the_workers(main_cluster: ClusterHandle, loaded: str, bucket: str) -> None:
    per_building = explain(main_cluster, f"SELECT building, {bucket} AS b, sum(kwh) FROM readings GROUP BY building, b")
    assert "Runs on: workers" in per_building and "GROUP BY building" in per_building, per_building
    # not keyed by building: partial aggregates on the workers, combined on the coordinator
    estate = explain(main_cluster, f"SELECT {bucket} AS b, sum(kwh) FROM readings GROUP BY b")
    assert "Shape: partial aggregate per fragment" in estate and "GROUP BY" in estate, estate
    with main_cluster.coordinator(admin=False) as conn:
        rows = conn.execute(
            f"SELECT building, {bucket} AS b, sum(kwh) FROM readings WHERE building = %s GROUP BY building, b ORDER BY b",
            (f"a{loaded}",),
        ).fetchall()
    assert sum(r[2] for r in rows) == sum(float(m) for m in range(1, 13))


def test_pushdown_off_uses_postgres_fdw_with_remote_aggregation(main_cluster: ClusterHandle, loaded: str) -> None:
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("SET buildsmart.enable_pushdown = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN (VERBOSE, COSTS OFF) SELECT building, meter, sum(kwh), count(*) FROM readings GROUP BY building, meter"
            ).fetchall()
        )
    remote = re.findall(r"Remote SQL: (.*)", plan)
    assert "BuildSmart" not in plan
    assert len(remote) == 5 and all("GROUP BY" in r for r in remote), plan
    assert plan.count("Async Foreign Scan") == 5, plan


def test_a_transaction_that_wrote_through_postgres_fdw_reads_through_it(main_cluster: ClusterHandle, loaded: str) -> None:
    """Uncommitted rows written through postgres_fdw are only visible on its connections: the
    distributed plan runs PostgreSQL's plan instead, and the transaction sees its own write."""
    b = f"t{loaded}"
    with main_cluster.coordinator(admin=False) as conn, conn.transaction():
        before = conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone()
        conn.execute("INSERT INTO readings VALUES (%s, 'el', '2024-01-01 00:00+00', 1)", (b,))
        after = conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone()
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM readings WHERE building = %s", (b,)
            ).fetchall()
        )
        assert before == (12,) and after == (13,)
        assert "this transaction wrote to readings through postgres_fdw" in plan, plan
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("DELETE FROM readings WHERE building = %s AND ts = '2024-01-01 00:00+00'", (b,))
        assert conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone() == (12,)


def test_queries_the_planner_does_not_know_still_answer(main_cluster: ClusterHandle, loaded: str) -> None:
    """A shape outside the pushdown rules (a volatile function, a sub-select) is planned by PostgreSQL."""
    plan = explain(main_cluster, "SELECT building FROM readings WHERE random() < 2 LIMIT 1")
    assert "BuildSmart" not in plan and "Foreign Scan" in plan, plan
    with main_cluster.coordinator(admin=False) as conn:
        got = conn.execute(
            "SELECT count(*) FROM readings WHERE building IN (SELECT building FROM readings WHERE building = %s)",
            (f"z{loaded}",),
        ).fetchone()
    assert got == (12,)


def test_insert_of_one_fragment_runs_on_its_worker(main_cluster: ClusterHandle, token: str) -> None:
    """A single-statement INSERT whose rows belong to one fragment is one statement on that worker;
    across fragments, or inside a transaction block, PostgreSQL's plan through postgres_fdw keeps it
    atomic. Either way the latest value wins and the row count is right."""
    b, other = f"c{token}", f"z{token}"
    with main_cluster.coordinator(admin=False) as conn:
        plan = "\n".join(
            r[0] for r in conn.execute(f"EXPLAIN (COSTS OFF) INSERT INTO readings VALUES ('{b}', 'el', '2023-05-01', 1)")
        )
        assert "INSERT of 1 row(s) into one fragment" in plan, plan
        cur = conn.execute(
            "INSERT INTO readings VALUES (%s, 'el', '2023-05-01 00:00+00', 1), (%s, 'el', '2023-05-01 01:00+00', 2)", (b, b)
        )
        assert cur.rowcount == 2
        got = conn.execute(
            "INSERT INTO readings VALUES (%s, 'el', '2023-05-01 00:00+00', 10) RETURNING building, kwh * 2", (b,)
        ).fetchall()
        assert got == [(b, 20.0)]
        # rows of two fragments: postgres_fdw, one transaction
        cur = conn.execute(
            "INSERT INTO readings VALUES (%s, 'el', '2023-05-01 02:00+00', 3), (%s, 'el', '2023-05-01 02:00+00', 4)", (b, other)
        )
        assert cur.rowcount == 2
        with conn.transaction():
            conn.execute("INSERT INTO readings VALUES (%s, 'el', '2023-05-01 03:00+00', 5)", (b,))
            assert conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone() == (4,)
        rows = conn.execute(
            "SELECT ts, kwh FROM readings WHERE building IN (%s, %s) ORDER BY building, ts", (b, other)
        ).fetchall()
    assert [k for _, k in rows] == [10.0, 2.0, 3.0, 5.0, 4.0]


def test_rolled_back_insert_in_a_transaction_leaves_nothing(main_cluster: ClusterHandle, token: str) -> None:
    b = f"t{token}"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO readings VALUES (%s, 'el', '2023-05-01 00:00+00', 1)", (b,))
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone() == (0,)


def test_update_or_delete_postgres_fdw_would_run_by_ctid_is_refused(main_cluster: ClusterHandle, token: str) -> None:
    """A DELETE/UPDATE that postgres_fdw cannot send whole would delete by ctid, which repeats in
    every time partition of a fragment (rows of other months would go too): it is refused with a
    hint, nothing changes; the same statement with constants runs on the worker."""
    b = f"g{token}"
    with main_cluster.coordinator(admin=False) as conn:
        # the first row of two fresh months: the same ctid (0,1) in two time partitions
        for ts in ("2023-01-01 00:00+00", "2023-02-01 00:00+00"):
            conn.execute("INSERT INTO readings VALUES (%s, 'el', %s, 1)", (b, ts))
        for stmt in (
            "DELETE FROM readings WHERE building = %s AND ts < '2023-01-15' AND ts < now()",
            "UPDATE readings SET kwh = random() WHERE building = %s AND ts < '2023-01-15'",
        ):
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot run on the workers as one statement"):
                conn.execute(stmt, (b,))
        assert conn.execute("SELECT count(*), sum(kwh) FROM readings WHERE building = %s", (b,)).fetchone() == (2, 2.0)
        assert conn.execute("DELETE FROM readings WHERE building = %s AND ts < '2023-01-15'", (b,)).rowcount == 1
        assert conn.execute("SELECT ts::date::text FROM readings WHERE building = %s", (b,)).fetchall() == [("2023-02-01",)]


def test_copy_through_the_coordinator_replaces_existing_readings(main_cluster: ClusterHandle, token: str) -> None:
    """COPY through the coordinator: the fragments' C trigger lets the last value of a key win,
    also for a key repeated inside the same COPY."""
    b = f"b4{token}"
    with main_cluster.coordinator(admin=False) as conn:
        with conn.cursor().copy("COPY readings FROM STDIN") as copy:
            for h, v in ((0, 1.0), (1, 2.0), (0, 3.0)):
                copy.write_row((b, "el", f"2023-06-01 0{h}:00+00", v))
        with conn.cursor().copy("COPY readings FROM STDIN") as copy:
            copy.write_row((b, "el", "2023-06-01 01:00+00", 7.0))
        got = conn.execute("SELECT kwh FROM readings WHERE building = %s ORDER BY ts", (b,)).fetchall()
    assert got == [(3.0,), (7.0,)]


def test_copy_streams_to_every_fragment_at_once_and_keeps_postgres_semantics(main_cluster: ClusterHandle, token: str) -> None:
    """COPY FROM STDIN outside a transaction block goes through the extension's COPY router (one
    COPY per fragment on its worker, all streaming at once) rather than postgres_fdw's batch
    INSERTs: the router says so at DEBUG1. Its rows equal what the postgres_fdw path stores; a bad
    value, or a row no fragment holds, fails the whole COPY with the line, storing nothing; inside
    a transaction block PostgreSQL's own COPY runs and rolls back with the transaction."""
    first, last = f"a{token}", f"z{token}"  # the first and the last fragment
    rows = [
        (b, m, f"2023-07-0{d} {h:02d}:00+00", float(d * 100 + h))
        for b in (first, last)
        for m in ("el", "gas")
        for d in (1, 2)
        for h in range(24)
    ]
    notices: list[str] = []
    with main_cluster.coordinator(admin=False) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SET client_min_messages = debug1")
        with conn.cursor().copy("COPY readings (building, meter, ts, kwh) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        conn.execute("SET client_min_messages = notice")
        routed = [n for n in notices if n.startswith("buildsmart: COPY readings streamed")]
        expected = rf"buildsmart: COPY readings streamed {len(rows)} rows to 2 of \d+ fragments"
        assert len(routed) == 1 and re.fullmatch(expected, routed[0]), notices
        got = conn.execute(
            "SELECT building, meter, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), kwh FROM readings "
            "WHERE building IN (%s, %s) ORDER BY 1, 2, 3",
            (first, last),
        ).fetchall()
        assert [(b, m, t, k) for b, m, t, k in got] == sorted((b, m, t[:16], k) for b, m, t, k in rows)

        # the same rows through postgres_fdw (router off) store the same values
        conn.execute("SET buildsmart.enable_copy_router = off")
        with conn.cursor().copy("COPY readings (building, meter, ts, kwh) FROM STDIN") as copy:
            for b, m, t, k in rows:
                copy.write_row((b, m + "2", t, k))
        conn.execute("RESET buildsmart.enable_copy_router")
        same = conn.execute(
            "SELECT count(*) FROM readings a JOIN readings b ON (a.building, a.meter || '2', a.ts, a.kwh) = "
            "(b.building, b.meter, b.ts, b.kwh) WHERE a.building IN (%s, %s) AND a.meter IN ('el', 'gas')",
            (first, last),
        ).fetchone()
        assert same == (len(rows),)

        # a bad value on line 3: nothing of the COPY is stored, on any fragment
        bad = f"{first}\tbad\t2023-08-01 00:00+00\t1\n{last}\tbad\t2023-08-01 00:00+00\t2\n{last}\tbad\t2023-08-01 01:00+00\tx\n"
        copy_in = "COPY readings FROM STDIN"
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as err, conn.cursor().copy(copy_in) as copy:
            copy.write(bad)
        assert "line 3" in str(err.value.diag.context), err.value.diag.context
        # a row without a building: PostgreSQL's partition routing error
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"), conn.cursor().copy(copy_in) as copy:
            copy.write(f"{first}\tbad\t2023-08-01 00:00+00\t1\n\\N\tbad\t2023-08-01 00:00+00\t2\n")
        # a row a worker refuses (kwh is NOT NULL there): its error, and the other stream rolled back
        with pytest.raises(psycopg.errors.NotNullViolation), conn.cursor().copy(copy_in) as copy:
            copy.write(f"{first}\tbad\t2023-08-01 00:00+00\t1\n{last}\tbad\t2023-08-01 00:00+00\t\\N\n")
        assert conn.execute("SELECT count(*) FROM readings WHERE meter = 'bad'").fetchone() == (0,)

        # inside a transaction block: PostgreSQL's COPY, undone by the rollback
        conn.execute("BEGIN")
        with conn.cursor().copy("COPY readings FROM STDIN") as copy:
            copy.write_row((first, "tx", "2023-08-01 00:00+00", 1.0))
        assert conn.execute("SELECT count(*) FROM readings WHERE meter = 'tx'").fetchone() == (1,)
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM readings WHERE meter = 'tx'").fetchone() == (0,)


def test_join_with_buildings_reads_only_the_matching_fragments(main_cluster: ClusterHandle, loaded: str) -> None:
    """Filtered on a column of buildings (not the key): only the fragments of the buildings that
    pass the filter are read; the answer equals PostgreSQL's own plan."""
    codes = {p: f"{p}{loaded}" for p in ("a", "b4", "c", "t", "z")}
    query = (
        "SELECT b.code, sum(r.kwh) / b.floor_area_m2 AS per_m2, count(*) FROM readings r "
        "JOIN buildings b ON b.code = r.building WHERE b.floor_area_m2 > 1000 AND r.ts >= '2023-03-01' "
        "GROUP BY b.code, b.floor_area_m2 ORDER BY 1"
    )
    with main_cluster.coordinator() as conn:
        for p, code in codes.items():
            area = 5000.0 if p in ("a", "z") else 10.0
            conn.execute("INSERT INTO buildings (code, floor_area_m2) VALUES (%s, %s)", (code, area))
    try:
        with main_cluster.coordinator(admin=False) as conn:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + query).fetchall())
            got = conn.execute(query).fetchall()
            conn.execute("SET buildsmart.enable_pushdown = off")
            want = conn.execute(query).fetchall()
        # the test's buildings a.. and z.. sit in the first and last of the five fragments
        assert "Fragments: 2 of 5" in plan, plan
        assert got == want and [r[0] for r in got] == [codes["a"], codes["z"]]
        assert got[0][2] == 10
    finally:
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM buildings WHERE code LIKE %s", (f"%{loaded}%",))

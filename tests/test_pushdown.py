"""Answers of pushed-down queries equal those of one plain PostgreSQL server holding the same rows.

Data spans the daylight-saving changes of Europe/London and America/New_York (23- and 25-hour
local days) in every fragment of the main cluster. Each query runs on the cluster (where EXPLAIN
must show it running on the workers) and on the plain server, in a UTC session and in a session
whose TimeZone is America/New_York (postgres_fdw's own sessions are UTC; the pushdown sessions get
the client's). Floats compare to 1e-9 relative: sums add in another order."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.ingest.loader import ingest
from orchestrator.osuser import service_user
from orchestrator.runtime import local
from orchestrator.runtime.ports import free_port
from orchestrator.topology import Credentials, Member
from tests.harness import ClusterHandle, make_tmp_dir, write_csv

PREFIXES = ("a", "b4", "c", "t", "z")  # one building in each fragment of the main cluster


@pytest.fixture(scope="module")
def plain() -> Iterator[str]:
    """One plain PostgreSQL server (the reference), stopped by PID at the end."""
    user = service_user()
    base = make_tmp_dir("bs-plain-")
    member = local.LocalMember(Member("plain", "127.0.0.1", free_port()), base / "data", base / "log")
    local.initdb(member, user, Credentials("ref", "ref-secret", "x", "x"))
    local.start(member, user)
    try:
        yield f"host=127.0.0.1 port={member.member.port} dbname=postgres user=ref password=ref-secret"
    finally:
        local.stop(member, user, mode="immediate")


def _rows(token: str) -> list[tuple[str, str, str, float]]:
    rnd = random.Random(11)
    spans = [(datetime(2023, 3, 10, tzinfo=UTC), 18 * 24), (datetime(2023, 10, 27, tzinfo=UTC), 12 * 24)]
    out = []
    for p in PREFIXES:
        for meter in ("el", "gas"):
            for start, hours in spans:
                for h in range(hours):
                    ts = (start + timedelta(hours=h)).strftime("%Y-%m-%d %H:%M:%S+00")
                    kwh = 0.0 if rnd.random() < 0.05 else round(rnd.uniform(0, 900), 3)
                    out.append((f"{p}{token}", meter, ts, kwh))
    return out


@pytest.fixture(scope="module")
def dataset(main_cluster: ClusterHandle, plain: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    token = "pd" + random.Random().randbytes(3).hex()
    rows = _rows(token)
    path = write_csv(Path(tmp_path_factory.mktemp("pushdown")) / "rows.csv", rows)
    ingest(main_cluster.directory, str(path))
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(
            'CREATE TABLE IF NOT EXISTS readings (building text COLLATE "C" NOT NULL, meter text NOT NULL, '
            "ts timestamptz NOT NULL, kwh double precision NOT NULL, PRIMARY KEY (building, meter, ts))"
        )
        with conn.cursor().copy("COPY readings FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        conn.execute("ANALYZE readings")
    with main_cluster.coordinator() as conn:
        conn.execute("ANALYZE readings")
    try:
        yield token
    finally:
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building LIKE %s", (f"%{token}%",))


# (name, SQL with {t} for the token filter, whether it must run on the workers)
QUERIES = [
    (
        "local-day-per-building",
        "SELECT building, meter, date_trunc('day', ts AT TIME ZONE 'Europe/London') AS d, sum(kwh), count(*) FROM readings "
        "WHERE {t} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    ),
    (
        "estate-day-new-york",
        "SELECT date_trunc('day', ts AT TIME ZONE 'America/New_York') AS d, sum(kwh), avg(kwh), count(*) FROM readings "
        "WHERE {t} GROUP BY 1 ORDER BY 1",
    ),
    (
        "session-zone-day",
        "SELECT date_trunc('day', ts) AS d, building, sum(kwh) FROM readings WHERE {t} GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "session-zone-hour-of-day",
        "SELECT extract(hour FROM ts) AS h, count(*), sum(kwh) FROM readings WHERE {t} GROUP BY 1 ORDER BY 1",
    ),
    ("local-date-cast", "SELECT ts::date AS d, building, max(kwh), min(kwh) FROM readings WHERE {t} GROUP BY 1, 2 ORDER BY 1, 2"),
    (
        "date-bin-estate",
        "SELECT date_bin('6 hours', ts, '2023-01-01 00:00+00') AS b, sum(kwh) FROM readings WHERE {t} GROUP BY 1 ORDER BY 1",
    ),
    (
        "latest-per-meter",
        "SELECT DISTINCT ON (building, meter) building, meter, ts, kwh FROM readings WHERE {t} ORDER BY building, meter, ts DESC",
    ),
    (
        "latest-before",
        "SELECT DISTINCT ON (building, meter) building, meter, ts, kwh FROM readings WHERE {t} AND ts < '2023-03-26 01:30+00' "
        "ORDER BY building, meter, ts DESC",
    ),
    (
        "first-per-meter",
        "SELECT DISTINCT ON (building, meter) building, meter, ts, kwh * 2 AS k FROM readings WHERE {t} "
        "ORDER BY building, meter, ts",
    ),
    (
        "top-rows-offset",
        "SELECT building, meter, ts, kwh FROM readings WHERE {t} ORDER BY kwh DESC, building, meter, ts LIMIT 7 OFFSET 3",
    ),
    ("top-buildings", "SELECT building, sum(kwh) AS total FROM readings WHERE {t} GROUP BY building ORDER BY total DESC LIMIT 3"),
    ("count-distinct", "SELECT count(DISTINCT building) AS b, count(*) AS n, sum(kwh), max(kwh) FROM readings WHERE {t}"),
    (
        "count-distinct-meter-per-day",
        "SELECT date_trunc('day', ts AT TIME ZONE 'UTC') AS d, count(DISTINCT meter) FROM readings WHERE {t} "
        "GROUP BY 1 ORDER BY 1",
    ),
    (
        "nulls-ordering",
        "SELECT building, ts, nullif(round(kwh)::int % 3, 0) AS n FROM readings WHERE {t} AND meter = 'el' "
        "ORDER BY n NULLS FIRST, building, ts LIMIT 40",
    ),
    (
        "nulls-in-aggregates",
        "SELECT date_trunc('week', ts AT TIME ZONE 'UTC') AS w, avg(nullif(kwh, 0)), count(nullif(kwh, 0)), "
        "min(CASE WHEN kwh > 5000 THEN kwh END), max(kwh) FILTER (WHERE kwh = 0) FROM readings WHERE {t} GROUP BY 1 ORDER BY 1",
    ),
    (
        "window-per-building",
        "SELECT building, ts, sum(kwh) OVER (PARTITION BY building, meter ORDER BY ts) AS running FROM readings "
        "WHERE {t} AND meter = 'gas' ORDER BY building, ts LIMIT 60",
    ),
    (
        "having",
        "SELECT building, meter, count(*) FROM readings WHERE {t} GROUP BY building, meter HAVING sum(kwh) > 1000 ORDER BY 1, 2",
    ),
    (
        "now-relative",
        "SELECT building, count(*) FROM readings WHERE {t} AND ts > now() - interval '100 years' GROUP BY building ORDER BY 1",
    ),
    (
        "avg-integer",
        "SELECT meter, avg(extract(hour FROM ts AT TIME ZONE 'UTC')::int) FROM readings WHERE {t} GROUP BY meter ORDER BY 1",
    ),
    ("rows-threshold", "SELECT building, meter, ts, kwh FROM readings WHERE {t} AND kwh > 850 ORDER BY building, meter, ts"),
]


def _canonical(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=lambda r: tuple("" if isinstance(v, float) else repr(v) for v in r))


def _equal(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]], ordered: bool) -> bool:
    if len(a) != len(b):
        return False
    if not ordered:
        a, b = _canonical(a), _canonical(b)
    for ra, rb in zip(a, b, strict=True):
        for va, vb in zip(ra, rb, strict=True):
            if va is None or vb is None:
                if va is not vb:
                    return False
            elif isinstance(va, float | int) and not isinstance(va, bool) and isinstance(vb, float | int):
                if not math.isclose(float(va), float(vb), rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif hasattr(va, "as_tuple") and hasattr(vb, "as_tuple"):  # Decimal
                if not math.isclose(float(va), float(vb), rel_tol=1e-12):
                    return False
            elif va != vb:
                return False
    return True


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
@pytest.mark.parametrize(("name", "sql"), QUERIES, ids=[q[0] for q in QUERIES])
def test_same_answer_as_one_plain_server(
    main_cluster: ClusterHandle, plain: str, dataset: str, name: str, sql: str, zone: str
) -> None:
    query = sql.format(t=f"building LIKE '%{dataset}%'")
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + query).fetchall())
        got = conn.execute(query).fetchall()
    with psycopg.connect(plain, autocommit=True) as ref:
        ref.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        want = ref.execute(query).fetchall()
    assert "Runs on: workers" in plan, f"{name} did not run on the workers:\n{plan}"
    assert want, f"{name}: the reference answer is empty; the test data does not exercise it"
    assert _equal(got, want, ordered="ORDER BY" in query), f"{name} ({zone}):\ncluster {got[:5]}...\nplain   {want[:5]}..."


def test_parameters_and_generic_plans(main_cluster: ClusterHandle, plain: str, dataset: str) -> None:
    """Prepared statements with a generic plan: parameters are evaluated on the coordinator and sent."""
    query = (
        "SELECT date_trunc('day', ts AT TIME ZONE $2) AS d, sum(kwh) FROM readings "
        "WHERE building = $1 AND ts >= $3::timestamptz AND ts < $3::timestamptz + $4::interval GROUP BY 1 ORDER BY 1"
    )
    args = [
        (f"c{dataset}", "Europe/London", "2023-03-24 00:00+00", "5 days"),
        (f"z{dataset}", "America/New_York", "2023-10-30 00:00+00", "8 days"),
    ]
    with main_cluster.coordinator(admin=False) as conn, psycopg.connect(plain, autocommit=True) as ref:
        for c in (conn, ref):
            c.execute("SET plan_cache_mode = force_generic_plan")
            c.execute(f"PREPARE q(text, text, text, text) AS {query}")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) EXECUTE q('x', 'UTC', '2023-01-01', '1 day')"))
        assert "Runs on: workers" in plan, plan
        for a in args:
            lits = ", ".join(f"'{v}'" for v in a)
            got = conn.execute(f"EXECUTE q({lits})").fetchall()
            want = ref.execute(f"EXECUTE q({lits})").fetchall()
            assert want and _equal(got, want, ordered=True), (a, got, want)


def _listed_fragments(plan: str) -> set[str]:
    """The fragments a distributed scan reads, from its EXPLAIN lines "Node bs_w1: readings_f2, ..."."""
    names: set[str] = set()
    for line in plan.splitlines():
        head, _, listed = line.strip().partition(": ")
        if head.startswith("Node ") and "Remote SQL" not in head:
            names |= {n.split(" ")[0] for n in listed.split(", ")}
    return names


def test_building_ranges_prune_fragments(main_cluster: ClusterHandle, plain: str, dataset: str) -> None:
    """building >= / > / < / <= (C order) read only the fragments whose ranges meet the condition,
    with constants and with a generic plan's parameters; answers equal the plain server's."""
    with main_cluster.coordinator(admin=False) as conn, psycopg.connect(plain, autocommit=True) as ref:
        every = _listed_fragments("\n".join(r[0] for r in conn.execute("EXPLAIN SELECT count(*) FROM readings")))
        assert len(every) >= 3
        lo, hi = f"c{dataset}", f"t{dataset}"
        checks = [
            ("building >= %s AND building < %s", (lo, hi)),
            ("building > %s AND building <= %s", (lo, hi)),
            ("%s::text <= building", (hi,)),
            ("building < %s", (lo,)),
        ]
        for where, args in checks:
            query = f"SELECT building, count(*), sum(kwh) FROM readings WHERE {where} AND building LIKE %s GROUP BY 1 ORDER BY 1"
            full = (*args, f"%{dataset}%")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + query, full))
            read = _listed_fragments(plan)
            assert read and len(read) < len(every), (where, plan)
            got, want = conn.execute(query, full).fetchall(), ref.execute(query, full).fetchall()
            assert want and _equal(got, want, ordered=True), (where, got, want)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        ranged = "SELECT count(*), sum(kwh) FROM readings WHERE building >= {} AND building < {} AND building LIKE {}"
        conn.execute("PREPARE r(text, text, text) AS " + ranged.format("$1", "$2", "$3"))
        full = (lo, hi, f"%{dataset}%")
        execute = psycopg.sql.SQL("EXECUTE r({}, {}, {})").format(*map(psycopg.sql.Literal, full))
        plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) ") + execute))
        assert 0 < len(_listed_fragments(plan)) < len(every), plan
        got = conn.execute(execute).fetchone()
        want = ref.execute(ranged.format("%s", "%s", "%s"), full).fetchone()
        assert got is not None and want is not None and got[0] == want[0] and math.isclose(got[1], want[1], rel_tol=1e-9)


def test_any_table_laid_out_like_readings_is_distributed(main_cluster: ClusterHandle, dataset: str) -> None:
    """A second table partitioned like readings (building ranges under the C collation, one
    foreign partition per fragment, columns building/meter/ts) gets the same pushdown: the shape
    rollup tables use. Its answer equals the same aggregate computed from readings."""
    from psycopg import sql

    from orchestrator import catalog
    from orchestrator.executor import partition_bounds

    table = f"daily_{dataset}"
    with main_cluster.coordinator() as coord:
        frags = [f for f in catalog.load_fragments(coord) if f.time_group is None]
        servers = dict(coord.execute("SELECT name, server_name FROM buildsmart.nodes WHERE server_name IS NOT NULL").fetchall())
        app = main_cluster.creds.app_user
        coord.execute(
            sql.SQL(
                'CREATE TABLE public.{} (building text COLLATE "C" NOT NULL, meter text NOT NULL, ts timestamptz NOT NULL, '
                "kwh double precision) PARTITION BY RANGE (building)"
            ).format(sql.Identifier(table))
        )
        try:
            for f in frags:
                remote = f"{table}_f{f.fragment_id}"
                with main_cluster.worker(f.node) as w:
                    w.execute(
                        sql.SQL(
                            "CREATE TABLE bsdata.{} AS SELECT building, meter, date_trunc('day', ts, 'UTC') AS ts, "
                            "sum(kwh) AS kwh FROM bsdata.{} GROUP BY 1, 2, 3"
                        ).format(sql.Identifier(remote), sql.Identifier(f.shard_name))
                    )
                    # the coordinator reads workers as the fdw role (its user mapping)
                    fdw = sql.Identifier(main_cluster.creds.fdw_user)
                    w.execute(sql.SQL("GRANT SELECT ON bsdata.{} TO {}").format(sql.Identifier(remote), fdw))
                coord.execute(
                    sql.SQL(
                        "CREATE FOREIGN TABLE bsdata.{} PARTITION OF public.{} {} SERVER {} "
                        "OPTIONS (schema_name 'bsdata', table_name {})"
                    ).format(
                        sql.Identifier(remote), sql.Identifier(table), partition_bounds(f), sql.Identifier(servers[f.node]),
                        sql.Literal(remote),
                    )
                )  # fmt: skip
            coord.execute(sql.SQL("GRANT SELECT ON public.{} TO {}").format(sql.Identifier(table), sql.Identifier(app)))
            with main_cluster.coordinator(admin=False) as conn:
                query = sql.SQL(
                    "SELECT building, date_trunc('month', ts, 'UTC') AS m, sum(kwh) FROM public.{} WHERE building LIKE {} "
                    "GROUP BY 1, 2 ORDER BY 1, 2"
                ).format(sql.Identifier(table), sql.Literal(f"%{dataset}%"))
                plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN (COSTS OFF) ") + query))
                assert "Runs on: workers" in plan, plan
                got = conn.execute(query).fetchall()
                want = conn.execute(
                    "SELECT building, date_trunc('month', ts, 'UTC') AS m, sum(kwh) FROM readings WHERE building LIKE %s "
                    "GROUP BY 1, 2 ORDER BY 1, 2",
                    (f"%{dataset}%",),
                ).fetchall()
                assert want and _equal(got, want, ordered=True)
        finally:
            coord.execute(sql.SQL("DROP TABLE public.{}").format(sql.Identifier(table)))
            for f in frags:
                with main_cluster.worker(f.node) as w:
                    w.execute(sql.SQL("DROP TABLE IF EXISTS bsdata.{}").format(sql.Identifier(f"{table}_f{f.fragment_id}")))


def test_latest_rows_of_a_building_read_each_meter_newest_first(main_cluster: ClusterHandle, plain: str, dataset: str) -> None:
    """ORDER BY ts [DESC], ... LIMIT n on one building reads each meter's rows in ts order by the
    primary key on the worker (EXPLAIN says so) instead of sorting all of the building's rows; the
    answers, in order, equal the plain server's, with OFFSET, extra quals, ascending order, NULLS
    placement and a prepared generic plan whose building and LIMIT are parameters."""
    building = f"c{dataset}"
    shapes = [
        "SELECT meter, ts, kwh FROM readings WHERE building = %s ORDER BY ts DESC, meter LIMIT 24",
        "SELECT meter, ts, kwh FROM readings WHERE building = %s ORDER BY ts DESC, meter DESC LIMIT 5 OFFSET 7",
        "SELECT ts, meter, kwh * 2 AS k FROM readings WHERE building = %s AND kwh > 450 ORDER BY ts, meter LIMIT 30",
        "SELECT meter, ts FROM readings WHERE building = %s AND ts < '2023-03-26 01:30+00' "
        "ORDER BY ts DESC, nullif(meter, 'gas') NULLS FIRST LIMIT 9",
    ]
    with main_cluster.coordinator(admin=False) as conn, psycopg.connect(plain, autocommit=True) as ref:
        for query in shapes:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + query, (building,)))
            assert "Runs on: workers" in plan and "rows of each meter in ts order by index" in plan, plan
            assert "bs_keys" in plan, plan  # the Remote SQL walks the meters
            got, want = conn.execute(query, (building,)).fetchall(), ref.execute(query, (building,)).fetchall()
            assert want and got == want, (query, got[:5], want[:5])
        # without a building the shape is not used (the key walk would visit every meter of the fragment), nor for
        # one meter (the worker reads that meter's primary key backwards as it is)
        for other in (
            "SELECT ts FROM readings ORDER BY ts DESC LIMIT 3",
            f"SELECT ts, kwh FROM readings WHERE building = '{building}' AND meter = 'el' ORDER BY ts DESC LIMIT 1",
        ):
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + other))
            assert "Runs on: workers" in plan and "in ts order by index" not in plan, plan
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(
            "PREPARE latest(text, bigint) AS SELECT meter, ts, kwh FROM readings WHERE building = $1 "
            "ORDER BY ts DESC, meter LIMIT $2"
        )
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) EXECUTE latest('x', 3)"))
        assert "rows of each meter in ts order by index" in plan, plan
        for b, n in ((building, 11), (f"z{dataset}", 40)):
            got = conn.execute(psycopg.sql.SQL("EXECUTE latest({}, {})").format(b, n)).fetchall()
            want = ref.execute(
                "SELECT meter, ts, kwh FROM readings WHERE building = %s ORDER BY ts DESC, meter LIMIT %s", (b, n)
            ).fetchall()
            assert len(want) == n and got == want, (b, got[:3], want[:3])


def test_fragments_of_a_node_run_as_one_statement(main_cluster: ClusterHandle, plain: str, dataset: str) -> None:
    """A node holding several of the fragments a query reads gets one statement over the UNION ALL
    of its fragment tables (planned, aggregated and sorted once, one set of parallel workers), not
    one sub-statement per fragment; answers equal the plain server's, also when the query
    qualifies its columns with the table's name or an alias."""
    queries = [
        "SELECT building, sum(kwh) AS total FROM readings WHERE building LIKE %s GROUP BY building ORDER BY total DESC LIMIT 3",
        "SELECT readings.building, readings.meter, readings.ts FROM readings WHERE readings.building LIKE %s "
        "AND readings.kwh > 800 ORDER BY 1, 2, 3",
        "SELECT r.building, count(*) FROM readings r WHERE r.building LIKE %s GROUP BY 1 ORDER BY 1",
    ]
    with main_cluster.coordinator(admin=False) as conn, psycopg.connect(plain, autocommit=True) as ref:
        for query in queries:
            args = (f"%{dataset}%",)
            plan = [r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + query, args)]
            several = [ln for ln in plan if ln.strip().startswith("Node ") and ", " in ln.partition(": ")[2]]
            assert several, "\n".join(plan)  # the main cluster has more fragments than workers
            node = several[0].strip().split(" ")[1].rstrip(":")
            remote = next(ln for ln in plan if ln.strip().startswith(f"Remote SQL ({node})"))
            assert "bs_union" not in remote and remote.count(" FROM (SELECT building, meter, ts, kwh FROM bsdata.") == 1, remote
            got, want = conn.execute(query, args).fetchall(), ref.execute(query, args).fetchall()
            assert want and _equal(got, want, ordered=True), (query, got[:3], want[:3])

"""Ingest on a real cluster: routing, results equal a reference, latest value wins, time partitions."""

from __future__ import annotations

import gzip
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orchestrator.catalog import load_fragments
from orchestrator.fragments import Router
from orchestrator.ingest.loader import ingest
from tests.harness import ClusterHandle, write_csv


def _rows(buildings: list[str], hours: int, seed: int = 7) -> list[tuple[str, str, str, float]]:
    rnd = random.Random(seed)
    start = datetime(2023, 1, 30, tzinfo=UTC)
    out = []
    for b in buildings:
        for meter in ("electricity", "gas"):
            for h in range(hours):
                ts = (start + timedelta(hours=h)).strftime("%Y-%m-%d %H:%M:%S+00")
                out.append((b, meter, ts, round(rnd.uniform(0, 50), 3)))
    return out


def _buildings(token: str) -> list[str]:
    # one building in each of the five fragments of the main cluster
    return [f"a{token}", f"b4{token}", f"c{token}", f"t{token}", f"z{token}"]


def test_each_row_is_on_the_worker_its_fragment_names(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    rows = _rows(_buildings(token), 72)
    path = write_csv(tmp_path / "r.csv", rows)
    result = ingest(main_cluster.directory, str(path))
    assert result.rows == len(rows) and result.inserted == len(rows) and result.rejected == 0

    with main_cluster.coordinator() as conn:
        fragments = load_fragments(conn)
    router = Router(fragments)
    expected: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for b, m, t, _ in rows:
        expected[router.route(b).shard_name].add((b, m, t))
    assert len(expected) == 5, "the test data must touch every fragment"
    for frag in fragments:
        with main_cluster.worker(frag.node) as conn:
            got = conn.execute(
                f"SELECT building, meter, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00') "
                f"FROM bsdata.{frag.shard_name} WHERE building LIKE %s",
                (f"%{token}%",),
            ).fetchall()
        assert set(got) == expected[frag.shard_name], f"{frag.shard_name} on {frag.node} holds other rows than routed"
        # and no other worker has a table with these rows
        for other in {f.node for f in fragments} - {frag.node}:
            with main_cluster.worker(other) as conn:
                assert conn.execute("SELECT to_regclass(%s) IS NULL", (f"bsdata.{frag.shard_name}",)).fetchone() == (True,)


def test_coordinator_results_equal_reference(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    rows = _rows(_buildings(token), 100, seed=11)
    path = tmp_path / "r.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("building,meter,ts,kwh\n" + "".join(f"{b},{m},{t},{k}\n" for b, m, t, k in rows))
    ingest(main_cluster.directory, str(path))
    ref_sum: dict[str, float] = defaultdict(float)
    ref_count: dict[str, int] = defaultdict(int)
    for b, _, _, k in rows:
        ref_sum[b] += k
        ref_count[b] += 1
    with main_cluster.coordinator(admin=False) as conn:
        got = conn.execute(
            "SELECT building, count(*), sum(kwh) FROM readings WHERE building LIKE %s GROUP BY building", (f"%{token}%",)
        ).fetchall()
        daily = conn.execute(
            "SELECT buildsmart.time_bucket('1 day', ts), sum(kwh) FROM readings WHERE building = %s AND meter = 'gas' "
            "GROUP BY 1 ORDER BY 1",
            (f"c{token}",),
        ).fetchall()
    assert {b: c for b, c, _ in got} == ref_count
    for b, _, s in got:
        assert abs(s - ref_sum[b]) < 1e-6
    ref_daily: dict[str, float] = defaultdict(float)
    for b, m, t, k in rows:
        if b == f"c{token}" and m == "gas":
            ref_daily[t[:10]] += k
    assert [(d.strftime("%Y-%m-%d"), round(s, 6)) for d, s in daily] == [(d, round(s, 6)) for d, s in sorted(ref_daily.items())]


def test_reingest_replaces_and_never_duplicates(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    first = write_csv(tmp_path / "1.csv", [(b, "el", "2023-03-01 00:00:00+00", 1.0), (b, "el", "2023-03-01 01:00:00+00", 2.0)])
    assert ingest(main_cluster.directory, str(first)).inserted == 2
    again = ingest(main_cluster.directory, str(first))
    assert (again.inserted, again.replaced, again.unchanged) == (0, 0, 2)
    # a resent reading with a new value replaces; repeats inside one file: the last line wins
    second = write_csv(
        tmp_path / "2.csv",
        [
            (b, "el", "2023-03-01 00:00:00+00", 5.0),
            (b, "el", "2023-03-01 02:00:00+00", 7.0),
            (b, "el", "2023-03-01 02:00:00+00", 8.0),
            (b, "el", "2023-03-01 03:00:00+01:00", 9.0),  # = 02:00 UTC: same key, written with another offset
        ],
    )
    res = ingest(main_cluster.directory, str(second))
    assert res.inserted == 1 and res.loaded == 4
    with main_cluster.coordinator() as conn:
        got = conn.execute(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'HH24'), kwh, count(*) OVER (PARTITION BY ts) FROM readings "
            "WHERE building = %s ORDER BY ts",
            (b,),
        ).fetchall()
    assert got == [("00", 5.0, 1), ("01", 2.0, 1), ("02", 9.0, 1)]


def test_sql_insert_through_coordinator_keeps_the_key_rule(main_cluster: ClusterHandle, token: str) -> None:
    b = f"c{token}"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute(
            "INSERT INTO readings VALUES (%s, 'el', '2023-05-01 00:00+00', 1), (%s, 'el', '2023-05-01 01:00+00', 2)", (b, b)
        )
        conn.execute("INSERT INTO readings VALUES (%s, 'el', '2023-05-01 00:00+00', 10)", (b,))
        got = conn.execute("SELECT kwh FROM readings WHERE building = %s ORDER BY ts", (b,)).fetchall()
    assert got == [(10.0,), (2.0,)]


def test_any_timestamp_finds_a_partition(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"z{token}"
    when = ["1970-01-01 00:00:00+00", "1999-12-31 23:00:00-05", "2100-06-15 12:00:00+00", "2023-07-01 00:00:00Z"]
    path = write_csv(tmp_path / "t.csv", [(b, "el", t, 1.5) for t in when])
    assert ingest(main_cluster.directory, str(path)).inserted == 4
    with main_cluster.coordinator() as conn:
        frag = next(f for f in load_fragments(conn) if f.holds(b))
        # SQL inserts into a month no partition exists for yet land in the DEFAULT partition ...
        conn.execute("INSERT INTO readings VALUES (%s, 'el', '2150-01-01 00:00+00', 3)", (b,))
    with main_cluster.worker(frag.node) as conn:
        parts = {
            r[0]
            for r in conn.execute(
                "SELECT tableoid::regclass::text FROM bsdata." + frag.shard_name + " WHERE building = %s", (b,)
            ).fetchall()
        }
        assert f"bsdata.{frag.shard_name}_default" in parts
        # ... and creating the partition later moves them out, losing nothing
        conn.execute(
            "SELECT buildsmart.ensure_time_partitions(%s::regclass, '1 month', '2150-01-01', '2150-01-01')",
            (f"bsdata.{frag.shard_name}",),
        )
        row = conn.execute(
            "SELECT tableoid::regclass::text, kwh FROM bsdata." + frag.shard_name + " WHERE building = %s AND ts = '2150-01-01'",
            (b,),
        ).fetchone()
    assert row == (f"bsdata.{frag.shard_name}_p21500101", 3.0)
    with main_cluster.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone() == (5,)


def test_latest_reading_per_meter(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    rows = _rows(_buildings(token), 30, seed=5)
    rows.append((f"c{token}", "water", "2023-01-30 02:00:00+00", 7.0))  # a meter that stopped early
    ingest(main_cluster.directory, str(write_csv(tmp_path / "l.csv", rows)))
    latest: dict[tuple[str, str], tuple[str, float]] = {}
    for b, m, t, k in rows:
        if (b, m) not in latest or t > latest[(b, m)][0]:
            latest[(b, m)] = (t, k)
    fmt = "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00')"
    with main_cluster.coordinator(admin=False) as conn:
        one = conn.execute(f"SELECT building, meter, {fmt}, kwh FROM buildsmart.latest_readings(%s)", (f"c{token}",)).fetchall()
        every = conn.execute(
            f"SELECT building, meter, {fmt}, kwh FROM latest_readings WHERE building LIKE %s", (f"%{token}",)
        ).fetchall()
    assert {(b, m): (t, k) for b, m, t, k in every} == latest
    assert {(b, m): (t, k) for b, m, t, k in one} == {key: v for key, v in latest.items() if key[0] == f"c{token}"}

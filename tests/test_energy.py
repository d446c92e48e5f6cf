"""Energy analytics against real servers (issue 14): local-day rollups over DST changes, cumulative
registers (rollover, reset, replacement) against a hand-computed reference, incremental upkeep
equal to a full recomputation after every kind of change, gaps and gap filling."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from orchestrator import catalog
from orchestrator.energy import gaps, reference, rollups
from orchestrator.ingest.loader import ingest
from orchestrator.nodeconn import NodeConnections
from tests.harness import ClusterHandle, write_csv

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _nodes(cluster: ClusterHandle) -> NodeConnections:
    return NodeConnections(cluster.topology, cluster.creds, "test")


def refresh(cluster: ClusterHandle) -> None:
    """What the task runner does every few seconds, now."""
    with _nodes(cluster) as nodes:
        reference.sync(nodes, catalog.load_fragments(nodes.coordinator))
        rollups.reconcile(nodes)
        rollups.refresh(nodes)


def rebuild(cluster: ClusterHandle, building: str) -> None:
    with _nodes(cluster) as nodes:
        frags = [f for f in catalog.load_fragments(nodes.coordinator) if f.holds(building)]
        rollups.refresh(nodes, frags, full=True)


def load(cluster: ClusterHandle, tmp_path: Path, name: str, rows: list[tuple[str, str, str, float | str]]) -> None:
    ingest(cluster.directory, str(write_csv(tmp_path / f"{name}.csv", rows)))


def rollup_rows(cluster: ClusterHandle, building: str) -> dict[str, list[tuple[Any, ...]]]:
    with cluster.coordinator(admin=False) as conn:
        hourly = conn.execute(
            "SELECT meter, ts, kwh, kwh_min, kwh_max, readings, expected, completeness FROM readings_hourly "
            "WHERE building = %s ORDER BY meter, ts",
            (building,),
        ).fetchall()
        daily = conn.execute(
            "SELECT meter, ts, day, kwh, kwh_min, kwh_max, readings, expected, completeness, month_expected "
            "FROM readings_daily WHERE building = %s ORDER BY meter, ts",
            (building,),
        ).fetchall()
    return {"hourly": hourly, "daily": daily}


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def assert_same(got: dict[str, list[tuple[Any, ...]]], want: dict[str, list[tuple[Any, ...]]], step: str) -> None:
    """Sums within 1e-9 relative; keys, counts, expected and completeness exact."""
    for kind in ("hourly", "daily"):
        assert len(got[kind]) == len(want[kind]), f"{step}: {kind} has {len(got[kind])} rows, a rebuild {len(want[kind])}"
        for g, w in zip(got[kind], want[kind], strict=True):
            assert all(_close(x, y) for x, y in zip(g, w, strict=True)), f"{step}: {kind} {g} != rebuilt {w}"


def assert_incremental_is_full(cluster: ClusterHandle, building: str, step: str) -> dict[str, list[tuple[Any, ...]]]:
    refresh(cluster)
    incremental = rollup_rows(cluster, building)
    rebuild(cluster, building)
    assert_same(incremental, rollup_rows(cluster, building), step)
    return incremental


@pytest.fixture
def metadata(main_cluster: ClusterHandle, token: str) -> Iterator[str]:
    """Buildings and meters of this test are removed afterwards (readings go with the token)."""
    yield token
    with main_cluster.coordinator() as conn:
        conn.execute("DELETE FROM public.meter_replacements WHERE building LIKE %s", (f"%{token}%",))
        conn.execute("DELETE FROM public.meters WHERE building LIKE %s", (f"%{token}%",))
        conn.execute("DELETE FROM public.buildings WHERE code LIKE %s", (f"%{token}%",))


def _hours(start: datetime, n: int) -> list[datetime]:
    return [start + timedelta(hours=i) for i in range(n)]


@pytest.mark.parametrize(
    ("zone", "spring", "autumn"),
    [
        ("Europe/London", datetime(2024, 3, 31), datetime(2024, 10, 27)),
        ("America/New_York", datetime(2024, 3, 10), datetime(2024, 11, 3)),
    ],
)
def test_dst_days_have_local_totals(
    main_cluster: ClusterHandle, metadata: str, tmp_path: Path, zone: str, spring: datetime, autumn: datetime
) -> None:
    b = f"t{metadata}_dst"
    tz = ZoneInfo(zone)
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("INSERT INTO public.buildings (code, time_zone) VALUES (%s, %s)", (b, zone))
    rows = []
    want: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for day in (spring, autumn):
        # every UTC hour from two local days before to two after the change
        start = datetime(day.year, day.month, day.day - 2, tzinfo=tz).astimezone(UTC)
        for i, t in enumerate(_hours(start, 24 * 5)):
            kwh = 0.25 + (i % 7)
            rows.append((b, "elec", t.isoformat(), kwh))
            local = t.astimezone(tz).date().isoformat()
            want[local] += kwh
            count[local] += 1
    load(main_cluster, tmp_path, "dst", rows)
    refresh(main_cluster)
    with main_cluster.coordinator(admin=False) as conn:
        got = conn.execute(
            "SELECT day, ts, kwh, readings, expected, completeness FROM readings_daily WHERE building = %s ORDER BY day", (b,)
        ).fetchall()
    by_day = {r[0].isoformat(): r for r in got}
    for day, hours in ((spring, 23), (autumn, 25)):
        d = by_day[day.date().isoformat()]
        assert d[1] == datetime(day.year, day.month, day.day, tzinfo=tz), d  # the day starts at local midnight
        assert (d[3], d[4], d[5]) == (hours, hours, 1.0), d
        assert math.isclose(d[2], want[day.date().isoformat()], rel_tol=1e-12), (d, want[day.date().isoformat()])
    for day, r in by_day.items():
        assert r[3] == count[day] and math.isclose(r[2], want[day], rel_tol=1e-12), (day, r)
    # local months: the view sums the local days
    with main_cluster.coordinator(admin=False) as conn:
        month = conn.execute(
            "SELECT kwh, readings FROM readings_monthly WHERE building = %s AND month = %s", (b, spring.date().replace(day=1))
        ).fetchone()
    in_month = [d for d in want if d.startswith(spring.strftime("%Y-%m"))]
    assert month is not None and month[1] == sum(count[d] for d in in_month)
    assert math.isclose(month[0], sum(want[d] for d in in_month), rel_tol=1e-12)


def test_cumulative_register_rollover_reset_replacement(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_reg"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("INSERT INTO public.buildings (code, time_zone) VALUES (%s, 'Europe/London')", (b,))
        conn.execute(
            "INSERT INTO public.meters (building, meter, kind, unit, reading_type, multiplier, register_max) "
            "VALUES (%s, 'gas', 'gas', 'kWh', 'cumulative', 2, 1000)",
            (b,),
        )
        # replaced at 07:30 (between the readings 25 and 12): the old register ended at 40, the new started at 10
        conn.execute(
            "INSERT INTO public.meter_replacements (building, meter, ts, old_final, new_initial) VALUES (%s, 'gas', %s, 40, 10)",
            (b, T0 + timedelta(hours=7, minutes=30)),
        )
    register = [100, 150, 400, 950, 30, 60, 5, 25, 12, 20]
    # by hand: +50, +250, +550, rollover 950->30 = +80, +30, reset 60->5 = +5, +20,
    # replacement: old 25->40 = 15 plus new 10->12 = 2, then +8; times the multiplier 2
    hand = [None, 50, 250, 550, 80, 30, 5, 20, 17, 8]
    rows = [(b, "gas", t.isoformat(), float(v)) for t, v in zip(_hours(T0, 10), register, strict=True)]
    late = rows.pop(5)  # arrives after the rest: out of order
    load(main_cluster, tmp_path, "reg1", rows[::-1])
    refresh(main_cluster)
    load(main_cluster, tmp_path, "reg2", [late])
    refresh(main_cluster)
    got = rollup_rows(main_cluster, b)
    hourly = [r[2] for r in got["hourly"]]
    assert hourly == [None if h is None else 2.0 * h for h in hand], hourly
    assert [r[5] for r in got["hourly"]] == [1] * 10
    (day,) = got["daily"]
    assert day[3] == 2.0 * sum(h for h in hand if h is not None) == 2020.0
    assert (day[6], day[7]) == (10, 24) and day[8] == 10 / 24
    with main_cluster.coordinator(admin=False) as conn:
        rule = conn.execute(
            "SELECT buildsmart.register_delta(950, 30, 1000), buildsmart.register_delta(60, 5, 1000), "
            "buildsmart.register_delta(60, 5, NULL), buildsmart.register_delta(5, 6, 1000)"
        ).fetchone()
    assert rule == (80.0, 5.0, 5.0, 1.0)


def test_late_corrected_deleted_readings_equal_a_rebuild(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_inc"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("INSERT INTO public.buildings (code, time_zone) VALUES (%s, 'Europe/London')", (b,))
        conn.execute(
            "INSERT INTO public.meters (building, meter, reading_type, register_max, expected_interval) "
            "VALUES (%s, 'reg', 'cumulative', 100000, '30 minutes')",
            (b,),
        )
    start = datetime(2024, 3, 29, 12, tzinfo=UTC)  # over the spring change in London
    times = _hours(start, 24 * 4)
    interval = [(b, "elec", t.isoformat(), 1.5 + (i % 5) * 0.1) for i, t in enumerate(times) if i % 10 != 3]
    total = 0.0
    register = []
    for i, t in enumerate(times):
        total += 2.0 + (i % 3)
        if i % 10 != 7:
            register.append((b, "reg", t.isoformat(), total))
    load(main_cluster, tmp_path, "first", interval + register)
    first = assert_incremental_is_full(main_cluster, b, "first load")
    assert first["daily"] and first["hourly"]

    late = [(b, "elec", t.isoformat(), 9.0) for i, t in enumerate(times) if i % 10 == 3]
    late += [(b, "reg", times[i].isoformat(), sum(2.0 + (j % 3) for j in range(i + 1))) for i in range(len(times)) if i % 10 == 7]
    load(main_cluster, tmp_path, "late", late)
    after_late = assert_incremental_is_full(main_cluster, b, "late readings")
    assert sum(r[5] for r in after_late["hourly"]) == 2 * len(times)

    corrected = [(b, "elec", times[i].isoformat(), 100.0) for i in (5, 30, 60)]
    corrected += [(b, "reg", times[40].isoformat(), float(register[38][3]) + 50.0)]
    load(main_cluster, tmp_path, "corrected", corrected)
    assert_incremental_is_full(main_cluster, b, "corrected readings")

    with main_cluster.coordinator(admin=False) as conn:
        conn.execute(
            "DELETE FROM readings WHERE building = %s AND ts >= %s AND ts < %s", (b, times[20], times[26])
        )  # both meters, over a local midnight
    assert_incremental_is_full(main_cluster, b, "deleted readings")

    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("UPDATE readings SET kwh = kwh * 3 WHERE building = %s AND meter = 'elec' AND ts >= %s", (b, times[70]))
    assert_incremental_is_full(main_cluster, b, "updated readings")

    with main_cluster.coordinator(admin=False) as conn:  # metadata: every day moves
        conn.execute("UPDATE public.buildings SET time_zone = 'America/New_York' WHERE code = %s", (b,))
    final = assert_incremental_is_full(main_cluster, b, "new time zone")
    assert {r[1].astimezone(ZoneInfo("America/New_York")).hour for r in final["daily"]} == {0}


def test_gaps_and_fill(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_gap"
    values = {0: 1.0, 1: 2.0, 2: 3.0, 6: 7.0, 7: 8.0}  # 03:00, 04:00, 05:00 missing
    load(main_cluster, tmp_path, "gap", [(b, "m", (T0 + timedelta(hours=h)).isoformat(), v) for h, v in values.items()])
    refresh(main_cluster)
    with _nodes(main_cluster) as nodes:
        found = gaps.find(nodes, b, T0, T0 + timedelta(hours=10))
    assert [(g.meter, g.gap_from, g.gap_to, g.missing) for g in found] == [
        ("m", T0 + timedelta(hours=3), T0 + timedelta(hours=6), 3),
        ("m", T0 + timedelta(hours=8), T0 + timedelta(hours=10), 2),  # after the last reading, to the window's end
    ]
    cli = main_cluster.run_cli("gaps", "--building", b)
    listed = [line.split() for line in cli.stdout.splitlines()]
    assert [b, "m", (T0 + timedelta(hours=3)).isoformat(), (T0 + timedelta(hours=6)).isoformat(), "3", "missing"] in listed

    def fill(mode: str, source: str = "raw") -> list[tuple[Any, ...]]:
        with main_cluster.coordinator(admin=False) as conn:
            return conn.execute(
                "SELECT bucket_start, value, readings, filled FROM buildsmart.gapfill(%s, 'm', '1 hour', %s, %s, %s, %s)",
                (b, T0, T0 + timedelta(hours=9), mode, source),
            ).fetchall()

    none = fill("none")
    assert [r[0] for r in none] == _hours(T0, 9)
    assert [r[1] for r in none] == [1.0, 2.0, 3.0, None, None, None, 7.0, 8.0, None]
    assert [r[2] for r in none] == [1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert [r[1] for r in fill("locf")] == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 7.0, 8.0, 8.0]
    interp = fill("interpolate")
    assert [r[1] for r in interp] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, None]
    assert [r[3] for r in interp] == [False, False, False, True, True, True, False, False, False]
    assert fill("interpolate", "hourly") == interp  # the same over the hourly rollups
    with main_cluster.coordinator(admin=False) as conn:
        day = conn.execute(
            "SELECT value, readings FROM buildsmart.gapfill(%s, 'm', '1 day', %s, %s, 'none', 'daily', 'sum', 'Europe/London')",
            (b, T0, T0 + timedelta(days=1)),
        ).fetchall()
    assert day == [(21.0, 5)]


def test_rollups_pushdown_and_cli(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_cli"
    load(main_cluster, tmp_path, "cli", [(b, "m", t.isoformat(), 1.0) for t in _hours(T0, 48)])
    with main_cluster.coordinator(admin=False) as conn:
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT building, sum(kwh) FROM readings_daily GROUP BY building"))
        one = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM readings_hourly WHERE building = %s", (b,)))
    assert "BuildSmart Distributed" in plan and "Runs on: workers" in plan and "readings_f4_daily" in plan, plan
    assert "Fragments: 1 of 1" in one and "readings_f4_hourly" in one, one
    refreshed = main_cluster.run_cli("rollups", "refresh")
    assert "refreshed:" in refreshed.stderr
    status = main_cluster.run_cli("rollups", "status")
    assert "readings_f4 on w2" in status.stdout, status.stdout
    rows = rollup_rows(main_cluster, b)
    assert sum(r[3] for r in rows["daily"]) == 48.0 and len(rows["hourly"]) == 48


def test_units_are_converted_at_ingest(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_unit"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute(
            "INSERT INTO public.meters (building, meter, kind, unit, calorific_value) VALUES "
            "(%s, 'water', 'water', 'm³', NULL), (%s, 'gas', 'gas', 'kWh', 11.2)",
            (b, b),
        )
    t = [(T0 + timedelta(hours=h)).isoformat() for h in range(3)]
    path = tmp_path / "units.csv"
    path.write_text(
        "building,meter,ts,kwh,unit\n"
        f"{b},water,{t[0]},1500,l\n{b},water,{t[1]},2,m3\n{b},gas,{t[0]},3,m³\n{b},elec,{t[0]},2500,Wh\n{b},elec,{t[1]},0.5,MWh\n"
    )
    ingest(main_cluster.directory, str(path))
    with main_cluster.coordinator(admin=False) as conn:
        got = conn.execute("SELECT meter, ts, kwh FROM readings WHERE building = %s ORDER BY meter, ts", (b,)).fetchall()
    want = [("elec", 2.5), ("elec", 500.0), ("gas", pytest.approx(33.6)), ("water", 1.5), ("water", 2.0)]
    assert [(m, v) for m, _, v in got] == want
    bad = tmp_path / "bad.csv"
    bad.write_text(f"building,meter,ts,kwh,unit\n{b},water,{t[2]},1,m3\n{b},water,{t[2]},5,kWh\n")
    proc = main_cluster.run_cli("ingest", str(bad), check=False)
    assert proc.returncode != 0
    column = len(f"{b},water,{t[2]},5,") + 1
    assert f"{bad}:3:{column}: kWh cannot become m³" in proc.stderr, proc.stderr
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"building,meter,ts,kwh,unit\n{b},elec,{t[2]},1,furlongs\n")
    proc = main_cluster.run_cli("ingest", str(unknown), check=False)
    assert proc.returncode != 0 and "unknown unit 'furlongs'" in proc.stderr, proc.stderr


def test_rollups_follow_a_fragment_move_and_check_covers_them(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    b = f"t{metadata}_mv"
    with main_cluster.coordinator(admin=False) as conn:
        conn.execute("INSERT INTO public.buildings (code, time_zone) VALUES (%s, 'America/New_York')", (b,))
    load(main_cluster, tmp_path, "mv", [(b, "m", t.isoformat(), 0.5 + i % 4) for i, t in enumerate(_hours(T0, 72))])
    refresh(main_cluster)
    before = rollup_rows(main_cluster, b)
    with main_cluster.coordinator() as conn:
        (frag,) = [f for f in catalog.load_fragments(conn) if f.holds(b)]
    home = frag.node
    away = next(w.name for w in main_cluster.topology.workers if w.name != home)
    main_cluster.run_cli("fragment", "move", str(frag.fragment_id), away)
    try:
        refresh(main_cluster)  # the rollups task: build next to the moved table, switch the partitions
        with main_cluster.coordinator(admin=False) as conn:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT * FROM readings_daily WHERE building = %s", (b,)))
        assert f"Node bs_{away}: {frag.shard_name}_daily" in plan, plan
        assert_same(rollup_rows(main_cluster, b), before, "after the move")
        with main_cluster.worker(home) as w:  # the old node's rollup tables are gone with the fragment
            assert w.execute("SELECT to_regclass(%s)", (f"bsdata.{frag.shard_name}_daily",)).fetchone() == (None,)
    finally:
        main_cluster.run_cli("fragment", "move", str(frag.fragment_id), home)
        refresh(main_cluster)
    assert_same(rollup_rows(main_cluster, b), before, "after moving back")

    from orchestrator import check

    with main_cluster.worker(home) as w:  # a stray row outside the fragment's building range
        w.execute(
            f"INSERT INTO bsdata.{frag.shard_name}_hourly (building, meter, ts, kwh, readings) VALUES (%s, 'm', %s, 1, 1)",
            (f"zz{metadata}", T0),
        )
    try:
        report = check.run_check(main_cluster.directory, replicas=False, pages=False)
        assert [f.obj for f in report.findings if "rollup row" in f.detail] == [f"{frag.shard_name}_hourly"], report.findings
    finally:
        with main_cluster.worker(home) as w:
            w.execute(f"DELETE FROM bsdata.{frag.shard_name}_hourly WHERE building = %s", (f"zz{metadata}",))


def test_meters_from_haystack_devices(main_cluster: ClusterHandle, metadata: str) -> None:
    from psycopg.types.json import Jsonb

    from orchestrator.metadata import haystack, importer
    from orchestrator.metadata.mirror import pg_connect
    from tests.harness import SHARED_DATA

    site = "p:demo:r:23a44701-a89a6c66"
    b = f"t{metadata}_cary"
    path = SHARED_DATA / "haystack" / "carytown.json"
    ids = sorted(e.id for e in haystack.parse_file(path))
    with main_cluster.coordinator() as conn:
        conn.execute("INSERT INTO public.buildings (code, attributes) VALUES (%s, %s)", (b, Jsonb({"haystack_id": site})))
    try:
        with pg_connect(main_cluster.directory, "test-import") as conn:
            importer.import_file(conn, path)
        out = main_cluster.run_cli("meters", "from-devices")
        assert "committed" in out.stderr, out.stderr
        with main_cluster.coordinator(admin=False) as conn:
            building = conn.execute("SELECT time_zone, floor_area_m2 FROM public.buildings WHERE code = %s", (b,)).fetchone()
            meters = conn.execute(
                "SELECT meter, kind, unit, reading_type, expected_interval FROM public.meters WHERE building = %s", (b,)
            ).fetchall()
        assert building is not None and building[0] == "America/New_York"  # Haystack's tz "New_York"
        assert building[1] == pytest.approx(3149 * 0.09290304)  # area 3149 ft² stored in m²
        # the one energy point (kWh, every 15 minutes) of the electricity meter; kW, °F, $ points are not meters
        assert meters == [("p:demo:r:23a44701-51b0b0ff", "electricity", "kWh", "interval", timedelta(minutes=15))]
    finally:
        with main_cluster.coordinator() as conn:
            conn.execute("DELETE FROM public.devices WHERE id = ANY(%s)", (ids,))


def test_refresh_waits_while_a_bulk_load_writes(main_cluster: ClusterHandle, metadata: str, tmp_path: Path) -> None:
    """A worker session of a bulk load (as `buildsmart ingest FILE` opens them) makes the task's
    refresh leave that worker's changes waiting; `rollups refresh` and a stream do not wait."""
    b = f"t{metadata}_bulk"
    main_cluster.run_cli("rollups", "config", "--pause")  # the cluster's own task would refresh first
    try:
        with _nodes(main_cluster) as nodes:  # what the (paused) task would have done before the load
            reference.sync(nodes, catalog.load_fragments(nodes.coordinator))
            rollups.reconcile(nodes)
        load(main_cluster, tmp_path, "bulk", [(b, "m", t.isoformat(), 2.0) for t in _hours(T0, 24)])
        _check_bulk_deferral(main_cluster, b)
    finally:
        main_cluster.run_cli("rollups", "config", "--resume")
    assert sum(r[2] for r in rollup_rows(main_cluster, b)["hourly"]) == 48.0


def _check_bulk_deferral(main_cluster: ClusterHandle, b: str) -> None:
    from orchestrator.connections import BULK_LOAD_APP, application_name, connect, ingest_target
    from orchestrator.energy.task import BULK_LOAD_MAX_LAG_S

    with _nodes(main_cluster) as nodes:
        frag = next(f for f in catalog.load_fragments(nodes.coordinator) if (f.range_from or "") <= b < (f.range_to or "\uffff"))
        worker = next(g for g in main_cluster.topology.workers if g.name == frag.node)
        wconn = nodes.get(frag.node)
        with connect(ingest_target(worker, main_cluster.creds), f"{BULK_LOAD_APP}:{frag.shard_name}"):
            assert rollups.bulk_load_running(wconn)
            deferred: list[str] = []
            done = rollups.refresh(nodes, [frag], defer_while_loading_s=BULK_LOAD_MAX_LAG_S, deferred=deferred)
            assert deferred == [frag.shard_name] and done == []
            assert rollup_rows(main_cluster, b)["hourly"] == []  # still waiting
            # a fragment whose rollups must be built from its raw rows waits too (the build reads them all)
            wconn.execute("DELETE FROM buildsmart.rollup_state WHERE shard = %s", (frag.shard_name,))
            rec = rollups.reconcile(nodes, defer_while_loading_s=BULK_LOAD_MAX_LAG_S)
            assert frag.shard_name in rec.waiting and frag.shard_name not in rec.built
            # asked for by hand (`rollups refresh` reconciles without waiting): built now
            rec = rollups.reconcile(nodes)
            assert frag.shard_name in rec.built
        # a stream's sessions (other tests' bulk loads may be open on this shared cluster) do not match
        row = wconn.execute(
            "SELECT %s LIKE %s", (application_name(f"ingest:{frag.shard_name}"), application_name(f"{BULK_LOAD_APP}:%"))
        ).fetchone()
        assert row is not None and row[0] is False

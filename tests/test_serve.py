"""The front door against the session's plain cluster, driven by clients nobody here wrote: phable
(a Project Haystack client) logs in with SCRAM, reads points by filter, hisReads a real Cambridge
meter and hisWrites; Prometheus' own parser reads /metrics; plain HTTP posts readings. Answers
are compared with SQL on the coordinator. The browser tests are in test_serve_browser.py; the
server is the session fixture ``front`` (tests/front.py)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from phable import AuthError, CallError, DateRange, DateTimeRange, HaystackClient, Number, Ref
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.catalog import load_fragments
from tests.front import BUILDING, LONDON, METER, PASSWORD, POINT, READER, WRITER, Front, basic


def sql_rows(front: Front, start: datetime, end: datetime, building: str = BUILDING) -> list[tuple[datetime, float]]:
    with front.handle.coordinator(admin=False) as conn:
        rows = conn.execute(
            "SELECT ts, kwh FROM readings WHERE building = %s AND meter = %s AND ts >= %s AND ts < %s ORDER BY ts",
            (building, METER, start, end),
        ).fetchall()
    return [(ts, float(k)) for ts, k in rows]


def his(grid: object) -> list[tuple[datetime, float]]:
    return [(r["ts"], float(r["val"].val)) for r in grid.rows]  # type: ignore[attr-defined]


def err_dis(exc: CallError) -> str:
    """The error grid's message (meta dis), as the client received it."""
    return str(exc.help_msg.meta["dis"])


def midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), LONDON)


@pytest.mark.parametrize("content_type", ["json", "zinc"])
def test_phable_logs_in_reads_by_filter_and_his_reads_a_cambridge_meter(front: Front, content_type: str) -> None:
    client = front.client(content_type=content_type)
    try:
        about = client.about()
        assert about["productName"] == "BuildSmartDB"
        points = client.read_all(f"point and his and siteRef == @site:{BUILDING}")
        ids = {r["id"].val for r in points.rows}
        assert POINT.val in ids
        point = next(r for r in points.rows if r["id"].val == POINT.val)
        assert point["tz"] == "London" and point["unit"] == "kWh" and point["kind"] == "Number"
        site = client.read_by_id(Ref(f"site:{BUILDING}"))
        assert site["tz"] == "London" and "site" in site

        # a date (the point's own day: 23 hours on the day the clocks go forward)
        day = date(2021, 3, 28)
        grid = client.his_read_by_id(POINT, day)
        expected = sql_rows(front, midnight(day), midnight(day + timedelta(days=1)))
        assert len(expected) == 23
        assert his(grid) == expected
        assert all(r["ts"].tzinfo is not None and r["ts"].utcoffset() in (timedelta(0), timedelta(hours=1)) for r in grid.rows)
        assert grid.meta["hisStart"] == midnight(day)

        # a date span: the end date is included, so a whole week of hourly readings
        span = DateRange(date(2019, 6, 1), date(2019, 6, 7))
        grid = client.his_read_by_id(POINT, span)
        expected = sql_rows(front, midnight(date(2019, 6, 1)), midnight(date(2019, 6, 8)))
        assert len(expected) == 7 * 24 and his(grid) == expected

        # a dateTime span (start inclusive, end exclusive)
        start, end = datetime(2023, 12, 31, 20, tzinfo=UTC), datetime(2024, 1, 1, 0, tzinfo=UTC)
        grid = client.his_read_by_id(POINT, DateTimeRange(start.astimezone(LONDON), end.astimezone(LONDON)))
        assert his(grid) == sql_rows(front, start, end) and len(grid.rows) == 4
    finally:
        client.close()


def test_wrong_password_and_missing_token_are_refused(front: Front) -> None:
    with pytest.raises(AuthError):
        HaystackClient.open(front.api, READER, "not the password")
    with pytest.raises(AuthError):
        HaystackClient.open(front.api, "nobody", PASSWORD)
    status, _ = front.get("/api/read?filter=point")
    assert status == 401
    status, _ = front.get("/api/read?filter=point", {"Authorization": "BEARER authToken=forged"})
    assert status == 401


def test_his_write_yesterday_through_phable_reads_back_and_latest_wins(front: Front) -> None:
    yesterday = datetime.now(LONDON).date() - timedelta(days=1)
    start = midnight(yesterday)
    hours = int((midnight(yesterday + timedelta(days=1)) - start).total_seconds() // 3600)
    rows = [{"ts": (start + timedelta(hours=h)).astimezone(LONDON), "val": Number(1.5 + h, "kWh")} for h in range(hours)]
    reader, writer = front.client(READER), front.client(WRITER)
    try:
        with pytest.raises(CallError) as refused:
            reader.his_write_by_id(POINT, rows)
        assert "rights" in err_dis(refused.value)
        writer.his_write_by_id(POINT, rows)
        writer.his_write_by_id(POINT, rows)  # idempotent: the same rows again change nothing
        got = his(reader.his_read_by_id(POINT, "yesterday"))  # type: ignore[arg-type]
        assert got == [(r["ts"], r["val"].val) for r in rows]
        assert got == sql_rows(front, start, start + timedelta(hours=hours))

        newer = [{"ts": rows[0]["ts"], "val": Number(99.0, "kWh")}]
        writer.his_write_by_id(POINT, newer)
        assert his(reader.his_read_by_id(POINT, "yesterday"))[0][1] == 99.0  # type: ignore[arg-type]
        assert len(sql_rows(front, start, start + timedelta(hours=hours))) == hours

        # bad input: a value in the wrong unit is refused with the row, and nothing is written
        bad = [{"ts": rows[1]["ts"], "val": Number(5.0, "kWh")}, {"ts": rows[2]["ts"], "val": Number(5.0, "°C")}]
        with pytest.raises(CallError) as refused:
            writer.his_write_by_id(POINT, bad)
        assert "request:2" in err_dis(refused.value) and "nothing" in err_dis(refused.value)
        assert sql_rows(front, rows[1]["ts"], rows[1]["ts"] + timedelta(hours=1)) == [(rows[1]["ts"], 2.5)]
    finally:
        with front.handle.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building = %s AND ts >= %s", (BUILDING, start))
        reader.close()
        writer.close()


def test_nav_and_read_by_ids_in_zinc(front: Front) -> None:
    client = front.client(content_type="zinc")
    try:
        nav = client.call("nav")
        assert any(r["id"].val == f"site:{BUILDING}" for r in nav.rows)
        grid = client.read_by_ids([POINT, Ref(f"site:{BUILDING}")])
        assert [r["id"].val for r in grid.rows] == [POINT.val, f"site:{BUILDING}"]
    finally:
        client.close()


def test_http_ingest_posts_csv_and_json_lines_with_the_loaders_rules(front: Front, token: str) -> None:
    b = f"t{token}_gw"
    csv_body = f"building,meter,ts,kwh\n{b},elec,2024-01-01 00:00:00+00,1.5\n{b},elec,2024-01-01 01:00:00+00,2.5\n".encode()
    status, body = front.get("/ingest", {**basic(WRITER), "Content-Type": "text/csv"}, csv_body)
    assert status == 200, body
    assert json.loads(body)["loaded"] == 2 and json.loads(body)["inserted"] == 2
    status, body = front.get("/ingest", {**basic(WRITER), "Content-Type": "text/csv"}, csv_body)
    assert status == 200 and json.loads(body)["unchanged"] == 2  # the same rows again: nothing changes

    lines = (
        json.dumps({"building": b, "meter": "elec", "ts": "2024-01-01T00:00:00Z", "kwh": 7.0}) + "\n"
        + '{"building": "' + b + '", "meter": "elec", "ts": "not a time", "kwh": 1}\n'
    ).encode()  # fmt: skip
    status, body = front.get("/ingest", {**basic(WRITER), "Content-Type": "application/x-ndjson"}, lines)
    assert status == 400 and "request:2" in json.loads(body)["error"] and "nothing" in json.loads(body)["error"]
    status, body = front.get("/ingest?rejects=skip", {**basic(WRITER), "Content-Type": "application/x-ndjson"}, lines)
    result = json.loads(body)
    assert status == 200 and result["loaded"] == 1 and result["replaced"] == 1 and result["rejects"][0]["line"] == 2

    status, _ = front.get("/ingest", {**basic(READER), "Content-Type": "text/csv"}, csv_body)
    assert status == 403
    with front.handle.coordinator(admin=False) as conn:
        got = conn.execute("SELECT ts, kwh FROM readings WHERE building = %s ORDER BY ts", (b,)).fetchall()
    assert [(t.astimezone(UTC).hour, float(k)) for t, k in got] == [(0, 7.0), (1, 2.5)]


def test_metrics_scrape_parses_with_prometheus_parser(front: Front) -> None:
    front.get("/api/about", basic(READER))  # at least one request timed
    status, body = front.get("/metrics", basic(READER))
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    topo = front.handle.topology
    up = {s.labels["node"]: s.value for s in families["buildsmart_node_up"].samples}
    assert up == {g.name: 1.0 for g in topo.groups}
    with front.handle.coordinator() as conn:
        frag_ids = {f.fragment_id for f in load_fragments(conn)}
    rows = {int(s.labels["fragment"]) for s in families["buildsmart_fragment_rows"].samples}
    assert rows == frag_ids
    assert all(s.value >= 0 for s in families["buildsmart_fragment_bytes"].samples)
    for name in (
        "buildsmart_mirror_readable", "buildsmart_jobs", "buildsmart_check_ok", "buildsmart_backup_configured",
        "buildsmart_http_request_duration_seconds", "buildsmart_http_ingest_rows", "buildsmart_status_age_seconds",
    ):  # fmt: skip
        assert name in families, sorted(families)
    counts = [s for s in families["buildsmart_http_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert any(s.labels["route"] == "/api/about" and s.value >= 1 for s in counts)
    status, _ = front.get("/metrics")
    assert status == 401

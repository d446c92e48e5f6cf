"""What the dashboard's building page shows, as SQL on the coordinator (application role): daily
energy over a year and hourly energy over one day, both in the building's local time; the latest
reading of each meter; and how complete each meter's hourly series is.

The day buckets are ``buildsmart.time_bucket('1 day', ts, zone)``, which the workers compute
(the zone is the extension's enum, so postgres_fdw ships it): a year of one building is one
pushed-down GROUP BY on its fragment. The cluster page renders the status snapshot as JSON
(:func:`status_json`), the same frozen value the CLI and /metrics render.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

from orchestrator.serve.records import Building
from orchestrator.serve.snapshot import Snapshot

DAILY_SQL = (
    "SELECT buildsmart.time_bucket('1 day', ts, %(zone)s::buildsmart.zone) AS day, meter, sum(kwh), count(*) "
    "FROM public.readings WHERE building = %(b)s AND ts >= %(start)s AND ts < %(end)s GROUP BY 1, 2 ORDER BY 1, 2"
)
HOURLY_SQL = (
    "SELECT ts, meter, kwh FROM public.readings WHERE building = %(b)s AND ts >= %(start)s AND ts < %(end)s ORDER BY ts, meter"
)
LATEST_SQL = "SELECT meter, ts, kwh FROM buildsmart.latest_readings(%(b)s) ORDER BY meter"
SPAN_SQL = (
    "SELECT meter, min(ts), max(ts), count(*) FROM public.readings "
    "WHERE building = %(b)s AND ts >= %(start)s AND ts < %(end)s GROUP BY meter"
)


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, datetime.min.time(), zone)


def building_year(pool: ConnectionPool, b: Building, year: int | None) -> dict[str, Any]:
    """Daily kWh per meter over one local year (default: the year of the newest reading), the
    latest reading of each meter, and completeness (hourly readings present / hours between the
    meter's first and last reading of that year)."""
    zone = ZoneInfo(b.time_zone)
    with pool.connection() as conn:
        latest = conn.execute(LATEST_SQL, {"b": b.code}).fetchall()
        if year is None:
            newest = max((r[1] for r in latest), default=None)
            year = newest.astimezone(zone).year if newest else datetime.now(zone).year
        start, end = _midnight(date(year, 1, 1), zone), _midnight(date(year + 1, 1, 1), zone)
        params = {"b": b.code, "zone": b.time_zone, "start": start, "end": end}
        daily = conn.execute(DAILY_SQL, params).fetchall()
        spans = conn.execute(SPAN_SQL, params).fetchall()
    days: dict[str, dict[str, float]] = {}
    meters = sorted({str(r[1]) for r in daily})
    for day, meter, kwh, _ in daily:
        days.setdefault(day.astimezone(zone).date().isoformat(), {})[str(meter)] = float(kwh)
    completeness = []
    for meter, first, last, n in spans:
        hours = (last - first).total_seconds() / 3600 + 1
        completeness.append(
            {"meter": meter, "first": first.astimezone(zone).isoformat(), "last": last.astimezone(zone).isoformat(),
             "readings": int(n), "expected_hourly": int(hours), "ratio": min(1.0, int(n) / hours) if hours > 0 else None}
        )  # fmt: skip
    return {
        "building": b.code,
        "time_zone": b.time_zone,
        "floor_area_m2": b.floor_area_m2,
        "year": year,
        "meters": meters,
        "days": [{"day": d, **v} for d, v in sorted(days.items())],
        "latest": [{"meter": m, "ts": ts.astimezone(zone).isoformat(), "kwh": float(k)} for m, ts, k in latest],
        "completeness": completeness,
    }


def building_day(pool: ConnectionPool, b: Building, day: date) -> dict[str, Any]:
    """Hourly kWh per meter over one local day (23 or 25 hours across a DST change)."""
    zone = ZoneInfo(b.time_zone)
    start, end = _midnight(day, zone), _midnight(day + timedelta(days=1), zone)
    with pool.connection() as conn:
        rows = conn.execute(HOURLY_SQL, {"b": b.code, "start": start, "end": end}).fetchall()
    hours: dict[str, dict[str, float]] = {}
    for ts, meter, kwh in rows:
        hours.setdefault(ts.astimezone(zone).isoformat(), {})[str(meter)] = float(kwh)
    return {
        "building": b.code,
        "time_zone": b.time_zone,
        "day": day.isoformat(),
        "meters": sorted({str(r[1]) for r in rows}),
        "hours": [{"ts": ts, **v} for ts, v in sorted(hours.items())],
    }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # Decimal, timedelta, enums: as text


def status_json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot for the cluster page: the ClusterStatus as plain JSON, and how fresh it is."""
    return {
        "collected_at": snap.collected_at or None,
        "age_s": round(time.time() - snap.collected_at, 1) if snap.collected_at else None,
        "collect_s": round(snap.seconds, 3),
        "error": snap.error,
        "status": None if snap.status is None else _plain(snap.status),
    }

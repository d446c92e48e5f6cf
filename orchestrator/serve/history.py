"""History of a meter point: ``hisRead`` reads it, ``hisWrite`` turns Haystack rows into readings.

Seam for rollups: :func:`source_for` picks where a span's history comes from. Today every point
reads ``public.readings`` (hourly rows; a year is 8,760 of them). When the hourly/daily rollups
exist, a long span can be answered from them by returning another :class:`HistorySource` here;
nothing else changes (the grid's ``hisRollup`` meta tag says which one answered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from psycopg_pool import ConnectionPool

from orchestrator.ingest.parse import Parsed, rows_to_batch
from orchestrator.serve.ids import PointKey
from orchestrator.serve.kinds import Number
from orchestrator.serve.ranges import Span
from orchestrator.serve.records import UNIT

HIS_SQL = (
    "SELECT ts, kwh FROM public.readings WHERE building = %(b)s AND meter = %(m)s AND ts >= %(start)s "
    "AND (%(end)s::timestamptz IS NULL OR ts < %(end)s) ORDER BY ts"
)

# The same rows with each ts already as ISO 8601 text in the point's zone (the transaction's
# TimeZone), milliseconds only when there are any: what the Haystack codecs write, without a
# datetime object per row in Python.
LOCAL_SQL = (
    "SELECT to_char(ts, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN date_part('microseconds', ts)::bigint %% 1000000 <> 0 "
    "THEN to_char(ts, '.MS') ELSE '' END || to_char(ts, 'TZH:TZM'), kwh FROM public.readings "
    "WHERE building = %(b)s AND meter = %(m)s AND ts >= %(start)s AND (%(end)s::timestamptz IS NULL OR ts < %(end)s) ORDER BY ts"
)


class HistorySource(Protocol):
    @property
    def name(self) -> str: ...

    def rows(self, pool: ConnectionPool, point: PointKey, span: Span) -> list[tuple[datetime, float]]: ...

    def local(self, pool: ConnectionPool, point: PointKey, span: Span, zone: ZoneInfo) -> tuple[list[str], list[float]]:
        """The span's times as ISO 8601 text in ``zone`` (with offsets) and the values."""
        ...


@dataclass(frozen=True)
class Readings:
    """The stored readings themselves (the building's fragment, pruned to the span's partitions)."""

    name: str = "readings"

    def rows(self, pool: ConnectionPool, point: PointKey, span: Span) -> list[tuple[datetime, float]]:
        with pool.connection() as conn:
            params = {"b": point.building, "m": point.meter, "start": span.start, "end": span.end}
            return [(r[0], float(r[1])) for r in conn.execute(HIS_SQL, params).fetchall()]

    def local(self, pool: ConnectionPool, point: PointKey, span: Span, zone: ZoneInfo) -> tuple[list[str], list[float]]:
        params = {"b": point.building, "m": point.meter, "start": span.start, "end": span.end}
        with pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_catalog.set_config('TimeZone', %s, true)", (zone.key,))
            rows = conn.execute(LOCAL_SQL, params).fetchall()
        return [r[0] for r in rows], [float(r[1]) for r in rows]


READINGS = Readings()


def source_for(span: Span) -> HistorySource:
    """Where a span's history comes from (the rollup seam: readings for every span today)."""
    return READINGS


def his_rows(rows: Sequence[tuple[datetime, float]], zone: ZoneInfo) -> list[dict[str, Any]]:
    return [{"ts": ts.astimezone(zone), "val": Number(kwh, UNIT)} for ts, kwh in rows]


class HisWriteError(Exception):
    """A hisWrite row that cannot become a reading (row number from 1, reason)."""


def readings_of(point: PointKey, rows: Sequence[tuple[Any, Any]], first: int = 1) -> Parsed:
    """hisWrite rows (ts, val) as readings, checked by the ingest path's own rules
    (orchestrator.ingest.parse.rows_to_batch), numbered from ``first`` so rejects name the row."""
    objects: list[tuple[int, object]] = []
    for n, (ts, val) in enumerate(rows, first):
        obj: dict[str, Any] = {"building": point.building, "meter": point.meter}
        if isinstance(ts, datetime) and ts.tzinfo is not None:
            obj["ts"] = ts.isoformat()
        else:
            obj["ts"] = None if ts is None else str(ts)  # rejected below with the usual reason
        if isinstance(val, Number):
            if val.unit not in (None, UNIT):
                obj["kwh"] = f"{val.val}{val.unit}"  # rejected: not a number of kWh
            else:
                obj["kwh"] = val.val if math.isfinite(val.val) else str(val.val)
        else:
            obj["kwh"] = val
        objects.append((n, obj))
    return rows_to_batch(objects)

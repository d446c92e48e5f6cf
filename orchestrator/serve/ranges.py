"""hisRead ranges (Project Haystack Ops): ``today``, ``yesterday``, ``{date}``, ``{date},{date}``,
``{dateTime},{dateTime}`` and ``{dateTime}`` (from then on), resolved in the POINT's time zone.

A range is a half-open span ``[start, end)`` of instants. Dates are whole local days, the end date
included (``2023-01-01,2023-01-03`` is three days, as Haystack's reference implementation reads
it); a local day is 23 or 25 hours across a DST change. Pure: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from orchestrator.exceptions import InputError, InputLocation
from orchestrator.serve import zinc


@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime | None  # None: up to the newest reading

    def days(self) -> float:
        return ((self.end or self.start) - self.start).total_seconds() / 86400


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), zone)


def _value(text: str, source: str) -> date | datetime:
    value = zinc.decode_value(text.strip(), source)
    if isinstance(value, (datetime, date)):
        return value
    raise InputError(InputLocation(source, 1), f"range part {text.strip()!r} is neither a date nor a dateTime")


def parse(text: str, zone: ZoneInfo, now: datetime, source: str = "range") -> Span:
    """The span of a hisRead ``range`` for a point in ``zone``."""
    raw = text.strip()
    today = now.astimezone(zone).date()
    if raw == "today":
        return Span(_midnight(today, zone), _midnight(today + timedelta(days=1), zone))
    if raw == "yesterday":
        return Span(_midnight(today - timedelta(days=1), zone), _midnight(today, zone))
    parts = raw.split(",")
    if len(parts) > 2 or not raw:
        raise InputError(
            InputLocation(source, 1), f"range {raw!r}: expected today, yesterday, a date, date,date or dateTime,dateTime"
        )
    first = _value(parts[0], source)
    second = _value(parts[1], source) if len(parts) == 2 else None
    if isinstance(first, datetime):
        if second is not None and not isinstance(second, datetime):
            raise InputError(InputLocation(source, 1), "range: a dateTime start needs a dateTime end")
        start = first.astimezone(zone)
        end = second.astimezone(zone) if second is not None else None
    else:
        if second is not None and (isinstance(second, datetime) or not isinstance(second, date)):
            raise InputError(InputLocation(source, 1), "range: a date start needs a date end")
        last = second if second is not None else first
        start, end = _midnight(first, zone), _midnight(last + timedelta(days=1), zone)
    if end is not None and end < start:
        raise InputError(InputLocation(source, 1), f"range {raw!r} ends before it starts")
    return Span(start, end)

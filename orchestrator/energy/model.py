"""Buildings and meters as metadata: validation of imported rows (pure), and the reference of
the register rule that the SQL function buildsmart.register_delta implements.

CSV headers (any column order; only the key columns are required):
- buildings: ``code,name,time_zone,floor_area_m2,site,floors``
- meters: ``building,meter,kind,unit,reading_type,multiplier,register_max,calorific_value,expected_interval``
A bad value is an InputError at its ``file:line:column``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orchestrator.energy.units import UnitError, canonical
from orchestrator.exceptions import InputError, InputLocation

MeterKind = Literal["electricity", "gas", "water", "heat", "cooling", "steam", "oil", "other"]
METER_KINDS: tuple[MeterKind, ...] = ("electricity", "gas", "water", "heat", "cooling", "steam", "oil", "other")
ReadingType = Literal["interval", "cumulative"]
READING_TYPES: tuple[ReadingType, ...] = ("interval", "cumulative")

BUILDING_COLUMNS = ("code", "name", "time_zone", "floor_area_m2", "site", "floors")
METER_COLUMNS = (
    "building", "meter", "kind", "unit", "reading_type", "multiplier", "register_max", "calorific_value", "expected_interval",
)  # fmt: skip


@dataclass(frozen=True)
class BuildingSpec:
    code: str
    name: str | None = None
    time_zone: str | None = None
    floor_area_m2: float | None = None
    site: str | None = None
    floors: int | None = None


@dataclass(frozen=True)
class MeterSpec:
    building: str
    meter: str
    kind: MeterKind = "electricity"
    unit: str = "kWh"
    reading_type: ReadingType = "interval"
    multiplier: float = 1.0
    register_max: float | None = None
    calorific_value: float | None = None
    expected_interval_s: float = 3600.0


def kind_from_name(meter: str) -> MeterKind:
    """A meter's kind guessed from its name, as the Cambridge data names its meters."""
    lowered = meter.lower()
    for kind in METER_KINDS:
        if kind in lowered:
            return kind
    return "electricity" if "elec" in lowered else "other"


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|second|seconds|min|minute|minutes|h|hour|hours|d|day|days)\s*$")
_SECONDS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600,
            "hours": 3600, "d": 86400, "day": 86400, "days": 86400}  # fmt: skip


def parse_interval(text: str) -> float:
    """'15 minutes', '1 hour', 'PT15M'-free plain forms; seconds."""
    m = _INTERVAL.match(text.lower())
    if not m:
        raise ValueError(f"expected interval {text!r} is not like '15 minutes' or '1 hour'")
    seconds = float(m.group(1)) * _SECONDS[m.group(2)]
    if seconds <= 0:
        raise ValueError("expected interval must be positive")
    return seconds


def check_zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r} (an IANA name such as Europe/London)") from None
    return text


Cells = dict[str, tuple[int, str]]  # column name -> (1-based column, value)


def _rows(text: str, source: str, columns: Sequence[str], required: Sequence[str]) -> list[tuple[int, Cells]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise InputError(InputLocation(source, 1), f"empty file: expected a header with {', '.join(required)}") from None
    unknown = [h for h in header if h not in columns]
    if unknown or any(r not in header for r in required) or len(set(header)) != len(header):
        raise InputError(
            InputLocation(source, 1, 1),
            f"wrong header {','.join(header)!r}: columns are {','.join(columns)} (required: {','.join(required)})",
        )
    out = []
    for line, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise InputError(InputLocation(source, line), f"expected {len(header)} fields, got {len(fields)}")
        col = 1
        cells = {}
        for name, value in zip(header, fields, strict=True):
            cells[name] = (col, value.strip())
            col += len(value) + 1
        out.append((line, cells))
    return out


def parse_buildings(text: str, source: str) -> list[BuildingSpec]:
    out = []
    for line, cells in _rows(text, source, BUILDING_COLUMNS, ("code",)):
        def get(name: str, cells: Cells = cells) -> str | None:
            return cells[name][1] or None if name in cells else None

        try:
            code = get("code")
            if not code:
                raise ValueError("code is empty")
            tz = get("time_zone")
            area = get("floor_area_m2")
            floors = get("floors")
            spec = BuildingSpec(
                code, get("name"), check_zone(tz) if tz else None, float(area) if area else None, get("site"),
                int(floors) if floors else None,
            )  # fmt: skip
        except ValueError as exc:
            raise InputError(InputLocation(source, line, _column(cells, exc)), _reason(exc)) from None
        out.append(spec)
    return out


def parse_meters(text: str, source: str) -> list[MeterSpec]:
    out = []
    for line, cells in _rows(text, source, METER_COLUMNS, ("building", "meter")):
        field = "building"
        try:
            values: dict[str, object] = {}
            for field in cells:
                raw = cells[field][1]
                if not raw:
                    if field in ("building", "meter"):
                        raise ValueError(f"{field} is empty")
                    continue
                values[field] = _meter_value(field, raw)
            if "kind" not in values:
                values["kind"] = kind_from_name(str(values["meter"]))
            if "expected_interval" in values:
                values["expected_interval_s"] = values.pop("expected_interval")
            spec = MeterSpec(**values)  # type: ignore[arg-type]
            if spec.register_max is not None and spec.reading_type != "cumulative":
                field = "register_max"
                raise ValueError("register_max is for cumulative meters only")
        except (ValueError, UnitError) as exc:
            raise InputError(InputLocation(source, line, cells.get(field, (0, ""))[0]), str(exc)) from None
        out.append(spec)
    return out


def _meter_value(field: str, raw: str) -> object:
    if field in ("building", "meter"):
        return raw
    if field == "kind":
        if raw.lower() not in METER_KINDS:
            raise ValueError(f"kind {raw!r} is not one of {', '.join(METER_KINDS)}")
        return raw.lower()
    if field == "unit":
        return canonical(raw)
    if field == "reading_type":
        if raw.lower() not in READING_TYPES:
            raise ValueError(f"reading_type {raw!r} is not interval or cumulative")
        return raw.lower()
    if field == "expected_interval":
        return parse_interval(raw)
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{field} {raw!r} is not a number") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{field} must be a positive number, not {raw!r}")
    return number


def _column(cells: dict[str, tuple[int, str]], exc: ValueError) -> int:
    text = str(exc)
    for name, (col, _) in cells.items():
        if text.startswith(name) or ("time zone" in text and name == "time_zone"):
            return col
    return 0


def _reason(exc: ValueError) -> str:
    return str(exc).replace("could not convert string to float:", "not a number:")


def interval_text(seconds: float) -> str:
    return f"{timedelta(seconds=seconds).total_seconds():g} seconds"


# ---------------------------------------------------------------- the register rule (reference)


def register_delta(prev: float, cur: float, register_max: float | None) -> float:
    """The rule of buildsmart.register_delta (sql/udfs/register_delta): a rise is consumption; a
    fall is a rollover when the register has a maximum and the wrapped delta is at most half of
    it, otherwise a reset (the register restarted from 0, so the reading itself was consumed)."""
    if cur >= prev:
        return cur - prev
    if register_max is not None and cur + register_max - prev <= register_max / 2:
        return cur + register_max - prev
    return cur

"""Buildings and meters into the coordinator: from CSV files (:mod:`.model` validates them), and
from the Haystack metadata `devices import` stored in public.devices (site ``tz`` and ``area``;
points with ``his``, a ``unit`` of energy or volume, ``hisTotalized``, and the markers elec, gas,
water, ...). Each import is one transaction; the workers' copies follow (orchestrator.energy.reference)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from orchestrator.energy.model import BuildingSpec, MeterSpec, kind_from_name
from orchestrator.energy.units import MeterUnit, UnitError, UnitTable, parse_unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportCounts:
    rows: int
    changed: int


def upsert_buildings(conn: psycopg.Connection, specs: Sequence[BuildingSpec]) -> ImportCounts:
    """Given columns replace stored ones; columns left empty keep what is stored."""
    changed = 0
    with conn.transaction():
        for s in specs:
            cur = conn.execute(
                "INSERT INTO public.buildings AS b (code, name, time_zone, floor_area_m2, site, floors) "
                "VALUES (%s, %s, coalesce(%s, 'UTC'), %s, %s, %s) ON CONFLICT (code) DO UPDATE SET "
                "name = coalesce(EXCLUDED.name, b.name), time_zone = coalesce(%s, b.time_zone), "
                "floor_area_m2 = coalesce(EXCLUDED.floor_area_m2, b.floor_area_m2), site = coalesce(EXCLUDED.site, b.site), "
                "floors = coalesce(EXCLUDED.floors, b.floors) "
                "WHERE (b.name, b.time_zone, b.floor_area_m2, b.site, b.floors) IS DISTINCT FROM "
                "(coalesce(EXCLUDED.name, b.name), coalesce(%s, b.time_zone), coalesce(EXCLUDED.floor_area_m2, b.floor_area_m2), "
                " coalesce(EXCLUDED.site, b.site), coalesce(EXCLUDED.floors, b.floors))",
                (s.code, s.name, s.time_zone, s.floor_area_m2, s.site, s.floors, s.time_zone, s.time_zone),
            )
            changed += cur.rowcount
    log.info("imported %d building(s), %d changed", len(specs), changed)
    return ImportCounts(len(specs), changed)


def upsert_meters(conn: psycopg.Connection, specs: Sequence[MeterSpec]) -> ImportCounts:
    changed = 0
    with conn.transaction():
        for s in specs:
            cur = conn.execute(
                "INSERT INTO public.meters AS m (building, meter, kind, unit, reading_type, multiplier, register_max, "
                "calorific_value, expected_interval) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, make_interval(secs => %s)) "
                "ON CONFLICT (building, meter) DO UPDATE SET kind = EXCLUDED.kind, unit = EXCLUDED.unit, "
                "reading_type = EXCLUDED.reading_type, multiplier = EXCLUDED.multiplier, register_max = EXCLUDED.register_max, "
                "calorific_value = EXCLUDED.calorific_value, expected_interval = EXCLUDED.expected_interval "
                "WHERE (m.kind, m.unit, m.reading_type, m.multiplier, m.register_max, m.calorific_value, m.expected_interval) "
                "IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.unit, EXCLUDED.reading_type, EXCLUDED.multiplier, "
                "EXCLUDED.register_max, EXCLUDED.calorific_value, EXCLUDED.expected_interval)",
                (s.building, s.meter, s.kind, s.unit, s.reading_type, s.multiplier, s.register_max, s.calorific_value,
                 s.expected_interval_s),
            )  # fmt: skip
            changed += cur.rowcount
    log.info("imported %d meter(s), %d changed", len(specs), changed)
    return ImportCounts(len(specs), changed)


_HAYSTACK_KINDS = {"elec": "electricity", "gas": "gas", "water": "water", "steam": "steam", "chilled": "cooling",
                   "hot": "heat", "heat": "heat", "fuelOil": "oil"}  # fmt: skip


def _value(v: Any) -> Any:
    return v.get("val") if isinstance(v, dict) and "val" in v else v


_AREA_M2 = {"m²": 1.0, "m2": 1.0, "ft²": 0.09290304, "ft2": 0.09290304}
_INTERVAL_S = {"s": 1, "sec": 1, "min": 60, "h": 3600, "hr": 3600, "hour": 3600, "day": 86400}


def _area_m2(area: Any) -> float | None:
    """Haystack ``area`` is a number with a unit (ft² in US data); stored in m²."""
    value = _value(area)
    if not isinstance(value, int | float):
        return None
    unit = area.get("unit", "m²") if isinstance(area, dict) else "m²"
    factor = _AREA_M2.get(str(unit))
    return None if factor is None else float(value) * factor


def _interval_s(his_interval: Any) -> float:
    if isinstance(his_interval, dict) and isinstance(his_interval.get("val"), int | float):
        scale = _INTERVAL_S.get(str(his_interval.get("unit")))
        if scale and his_interval["val"] > 0:
            return float(his_interval["val"]) * scale
    return 3600.0


def from_devices(conn: psycopg.Connection) -> tuple[ImportCounts, ImportCounts]:
    """Buildings' time zone and area from Haystack sites, meters from history points whose unit
    is energy or volume (the point id is the meter id), linked to a building. The kind comes
    from the point's markers or its equipment's (``elec``, ``gas``, ... on the meter equip)."""
    sites = conn.execute(
        "SELECT building, metadata FROM public.devices WHERE kind = 'site' AND building IS NOT NULL"
    ).fetchall()
    buildings = []
    for code, meta in sites:
        tz = meta.get("tz")
        zone = None
        if isinstance(tz, str):
            zone = tz if "/" in tz or tz == "UTC" else _haystack_zone(conn, tz)
        buildings.append(BuildingSpec(str(code), meta.get("dis"), zone, _area_m2(meta.get("area"))))
    points = conn.execute(
        "SELECT p.id, p.building, p.metadata, coalesce(e.metadata, '{}'::jsonb) FROM public.devices p "
        "LEFT JOIN public.devices e ON e.id = p.metadata->>'equipRef' "
        "WHERE p.kind = 'point' AND p.building IS NOT NULL AND p.metadata ? 'his' AND p.metadata ? 'unit'"
    ).fetchall()
    meters = []
    for pid, code, meta, equip in points:
        try:
            unit = parse_unit(str(meta["unit"]))
        except UnitError:
            continue
        if unit.quantity == "power":
            continue  # demand, not a meter of energy or volume
        kind = next(
            (k for marker, k in _HAYSTACK_KINDS.items() if meta.get(marker) is True or equip.get(marker) is True),
            kind_from_name(str(pid)),
        )
        reading = "cumulative" if meta.get("hisTotalized") is True else "interval"
        meters.append(
            MeterSpec(str(code), str(pid), kind, unit.name, reading, expected_interval_s=_interval_s(meta.get("hisInterval")))  # type: ignore[arg-type]
        )
    return upsert_buildings(conn, [b for b in buildings if b.time_zone or b.floor_area_m2]), upsert_meters(conn, meters)


def _haystack_zone(conn: psycopg.Connection, city: str) -> str | None:
    """Haystack names zones by their city ("New_York"); the IANA name ends with it."""
    row = conn.execute(
        "SELECT name FROM pg_catalog.pg_timezone_names WHERE name LIKE %s ORDER BY length(name) LIMIT 1", (f"%/{city}",)
    ).fetchone()
    return None if row is None else str(row[0])


def unit_table(conn: psycopg.Connection) -> UnitTable:
    """Each meter's canonical unit, for ingest's conversions (meters in kWh without a calorific
    value need no entry: that is the default)."""
    row = conn.execute("SELECT pg_catalog.to_regclass('public.meters') IS NOT NULL").fetchone()
    if not (row and row[0]):
        return UnitTable()
    rows = conn.execute(
        "SELECT building, meter, unit, calorific_value FROM public.meters WHERE unit <> 'kWh' OR calorific_value IS NOT NULL"
    ).fetchall()
    return UnitTable({(str(b), str(m)): MeterUnit(str(u), cv) for b, m, u, cv in rows})

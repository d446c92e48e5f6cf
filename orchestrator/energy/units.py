"""Units of readings and their conversion to a meter's canonical unit (pure).

Why here and not in SQL: ingest converts before rows are written, vectorised per distinct
(meter, unit), and a row whose unit is unknown or cannot become its meter's unit is a bad-input
error at its file:line:column like any other. Quantities: energy (Wh, kWh, MWh, GWh, kJ, MJ, GJ,
therm, kBtu), volume (m³, l, ft³, hcf) and power (W, kW, MW; demand, never converted to energy).
Volume and energy convert into each other only with the meter's calorific value (kWh per m³),
as gas bills do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Quantity = Literal["energy", "volume", "power"]


@dataclass(frozen=True)
class Unit:
    name: str  # canonical spelling
    quantity: Quantity
    scale: float  # in the quantity's base unit: kWh, m³ or kW


_UNITS = (
    Unit("Wh", "energy", 1e-3),
    Unit("kWh", "energy", 1.0),
    Unit("MWh", "energy", 1e3),
    Unit("GWh", "energy", 1e6),
    Unit("kJ", "energy", 1 / 3600),
    Unit("MJ", "energy", 1 / 3.6),
    Unit("GJ", "energy", 1e3 / 3.6),
    Unit("therm", "energy", 29.3071107),
    Unit("kBtu", "energy", 0.29307107),
    Unit("m³", "volume", 1.0),
    Unit("l", "volume", 1e-3),
    Unit("ft³", "volume", 0.028316846592),
    Unit("hcf", "volume", 2.8316846592),
    Unit("W", "power", 1e-3),
    Unit("kW", "power", 1.0),
    Unit("MW", "power", 1e3),
)
_ALIASES = {
    "m3": "m³",
    "cubic_meter": "m³",
    "cubic meter": "m³",
    "litre": "l",
    "liter": "l",
    "L": "l",
    "ft3": "ft³",
    "cubic_foot": "ft³",
    "kilowatt_hour": "kWh",
    "kilowatt-hour": "kWh",
    "megawatt_hour": "MWh",
    "watt_hour": "Wh",
    "kilowatt": "kW",
    "watt": "W",
    "megawatt": "MW",
    "therms": "therm",
    "ccf": "hcf",
}
_BY_NAME = {u.name: u for u in _UNITS}
_BY_FOLDED = {u.name.casefold(): u for u in _UNITS if u.name not in ("MW", "MWh")}  # M and m differ only there
DEFAULT_UNIT = "kWh"


class UnitError(ValueError):
    """A unit that is not known, or that cannot become the wanted one."""


def parse_unit(text: str) -> Unit:
    """The unit named by ``text`` (canonical spelling, an alias, or a case variant)."""
    t = text.strip()
    name = _ALIASES.get(t, _ALIASES.get(t.casefold(), t))
    unit = _BY_NAME.get(name) or _BY_FOLDED.get(name.casefold())
    if unit is None:
        raise UnitError(f"unknown unit {text!r} (known: {', '.join(u.name for u in _UNITS)})")
    return unit


def canonical(text: str) -> str:
    return parse_unit(text).name


def factor(source: str, target: str, calorific_kwh_per_m3: float | None = None) -> float:
    """What a value in ``source`` is multiplied by to be in ``target``."""
    a, b = parse_unit(source), parse_unit(target)
    if a.quantity == b.quantity:
        return a.scale / b.scale
    if {a.quantity, b.quantity} == {"energy", "volume"}:
        if calorific_kwh_per_m3 is None:
            raise UnitError(f"{a.name} cannot become {b.name} without the meter's calorific value (kWh per m³)")
        if a.quantity == "volume":  # m³ -> kWh -> target
            return a.scale * calorific_kwh_per_m3 / b.scale
        return a.scale / calorific_kwh_per_m3 / b.scale
    raise UnitError(f"{a.name} ({a.quantity}) cannot become {b.name} ({b.quantity})")


@dataclass(frozen=True)
class MeterUnit:
    unit: str = DEFAULT_UNIT
    calorific_value: float | None = None


@dataclass(frozen=True)
class UnitTable:
    """The canonical unit of each known meter (building, meter); others are in kWh."""

    meters: Mapping[tuple[str, str], MeterUnit] = field(default_factory=dict)

    def of(self, building: str, meter: str) -> MeterUnit:
        return self.meters.get((building, meter), DEFAULT_METER)

    def factor(self, building: str, meter: str, unit: str) -> float:
        """Factor from ``unit`` to the meter's unit; UnitError names the meter."""
        m = self.of(building, meter)
        try:
            return factor(unit, m.unit, m.calorific_value)
        except UnitError as exc:
            raise UnitError(f"{exc} (meter {meter!r} of building {building!r} is in {m.unit})") from None


DEFAULT_METER = MeterUnit()
DEFAULT_TABLE = UnitTable()

"""Pure rules of the energy model, without servers: units and their conversions, metadata CSV
validation with file:line:column errors, the register rule, the rollup partition switch."""

from __future__ import annotations

import math

import pytest

from orchestrator.energy import model, units
from orchestrator.energy.rollups import Placement, plan_switch
from orchestrator.exceptions import InputError


def test_unit_factors() -> None:
    assert units.factor("Wh", "kWh") == pytest.approx(1e-3)
    assert units.factor("MWh", "kWh") == 1000.0
    assert units.canonical("KWH") == "kWh" and units.canonical("kilowatt_hour") == "kWh"
    with pytest.raises(units.UnitError):
        units.parse_unit("mwh")  # M (mega) and m (milli) differ only in case: not guessed
    assert units.factor("GJ", "kWh") == pytest.approx(277.7777777777778)
    assert units.factor("therm", "kWh") == pytest.approx(29.3071107)
    assert units.factor("l", "m3") == pytest.approx(1e-3)
    assert units.factor("ft3", "m³") == pytest.approx(0.028316846592)
    # volume to energy only with a calorific value (kWh per m³)
    assert units.factor("m3", "kWh", 11.2) == pytest.approx(11.2)
    assert units.factor("kWh", "m3", 11.2) == pytest.approx(1 / 11.2)
    with pytest.raises(units.UnitError, match="calorific"):
        units.factor("m3", "kWh")
    with pytest.raises(units.UnitError, match="cannot become"):
        units.factor("kW", "kWh")
    with pytest.raises(units.UnitError, match="unknown unit"):
        units.parse_unit("furlongs")


def test_unit_table_names_the_meter() -> None:
    table = units.UnitTable({("b1", "gas"): units.MeterUnit("m³", None)})
    assert table.factor("b1", "gas", "l") == pytest.approx(1e-3)
    assert table.factor("b1", "other", "Wh") == pytest.approx(1e-3)  # unknown meters are in kWh
    with pytest.raises(units.UnitError, match="meter 'gas' of building 'b1' is in m³"):
        table.factor("b1", "gas", "kWh")


def test_meter_csv_is_validated_with_locations() -> None:
    text = "building,meter,reading_type,register_max,unit,expected_interval\nb1,Gas main,cumulative,99999,m3,30 minutes\n"
    (m,) = model.parse_meters(text, "meters.csv")
    assert (m.kind, m.unit, m.reading_type, m.register_max, m.expected_interval_s) == ("gas", "m³", "cumulative", 99999.0, 1800.0)
    with pytest.raises(InputError) as err:
        model.parse_meters("building,meter,unit\nb1,m1,furlongs\n", "meters.csv")
    assert str(err.value).startswith("meters.csv:2:7:"), str(err.value)
    with pytest.raises(InputError) as err:
        model.parse_meters("building,meter,multiplier\nb1,m1,-2\n", "meters.csv")
    assert str(err.value).startswith("meters.csv:2:7:") and "positive" in str(err.value)
    with pytest.raises(InputError, match=r"meters\.csv:1:1: wrong header"):
        model.parse_meters("building,metre\n", "meters.csv")
    with pytest.raises(InputError) as err:
        model.parse_buildings("code,time_zone\nb1,Mars/Olympus\n", "b.csv")
    assert str(err.value).startswith("b.csv:2:4:") and "time zone" in str(err.value)


def test_kind_from_cambridge_names() -> None:
    assert model.kind_from_name("Gas Main") == "gas"
    assert model.kind_from_name("Elec Incomer 1") == "electricity"
    assert model.kind_from_name("Water") == "water"
    assert model.kind_from_name("Chiller 3") == "other"


def test_register_rule() -> None:
    assert model.register_delta(100, 150, None) == 50
    assert model.register_delta(950, 30, 1000) == 80  # rollover: wrapped delta within half the register
    assert model.register_delta(400, 30, 1000) == 30  # too far to be a rollover: a reset from 0
    assert model.register_delta(60, 5, None) == 5  # no maximum: every fall is a reset
    assert all(model.register_delta(p, c, 1000) >= 0 for p in range(0, 1000, 37) for c in range(0, 1000, 41))
    assert math.isclose(model.register_delta(0.1, 0.3, None), 0.2)


def test_partition_switch_plan() -> None:
    a = Placement("f1", "w1", None, "m", None, None, None)
    b = Placement("f2", "w2", "m", None, None, None, None)
    moved = Placement("f2", "w1", "m", None, None, None, None)
    assert plan_switch([a, b], [a, b]) == ([], [])
    assert plan_switch([a, b], [a, moved]) == ([b], [moved])
    assert plan_switch([a], [a, b]) == ([], [b])
    assert plan_switch([a, b], [a]) == ([b], [])


def test_rollup_refresh_takes_at_most_15_percent_of_the_time() -> None:
    from orchestrator.energy.task import again_after

    assert again_after(0.05) == 1.0  # a quick refresh (a live stream): the next one a second later
    assert again_after(1.5) == pytest.approx(8.5)  # 1.5 s of refresh in every 10 s while a load runs
    assert again_after(60.0) == 30.0  # never more than 30 s behind a load
    assert again_after(1.0, share=0.5) == 1.0


def test_rollup_refresh_waits_for_a_bulk_load_up_to_its_lag() -> None:
    from orchestrator.energy.rollups import defer_for_bulk_load

    assert defer_for_bulk_load(True, 10.0, 120.0)  # a file load writes: its changes wait
    assert not defer_for_bulk_load(True, 120.0, 120.0)  # ... but never more than the lag
    assert not defer_for_bulk_load(False, 10.0, 120.0)  # a stream (or nothing) writes: refresh now
    assert not defer_for_bulk_load(True, 10.0, None)  # `buildsmart rollups refresh`: now, whatever writes

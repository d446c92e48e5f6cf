"""Haystack JSON (version 4, "Hayson", ``application/json``): encode grids, decode request grids.

Plain JSON strings, numbers, booleans and null are Str, unitless Number, Bool and null; every
other kind is an object with ``_kind``. Version 3's prefixed strings (``"s:..."``) are not read: a
v4 string may legitimately start with ``s:``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from orchestrator.exceptions import ConfigError, InputError, InputLocation
from orchestrator.serve import tz
from orchestrator.serve.kinds import MARKER, NA, REMOVE, Col, Coord, Grid, His, Number, Ref, Symbol, Uri, XStr

MEDIA_TYPE = "application/json"


def _number(val: float, unit: str | None) -> Any:
    if not math.isfinite(val):
        text = "NaN" if math.isnan(val) else ("INF" if val > 0 else "-INF")
        return {"_kind": "number", "val": text, **({"unit": unit} if unit else {})}
    if unit is None:
        return int(val) if val == int(val) and abs(val) < 1e15 else val
    return {"_kind": "number", "val": int(val) if val == int(val) and abs(val) < 1e15 else val, "unit": unit}


def to_json(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if value is MARKER:
        return {"_kind": "marker"}
    if value is NA:
        return {"_kind": "na"}
    if value is REMOVE:
        return {"_kind": "remove"}
    if isinstance(value, int | float):
        return _number(float(value), None)
    if isinstance(value, Number):
        return _number(value.val, value.unit)
    if isinstance(value, Ref):
        return {"_kind": "ref", "val": value.val, **({"dis": value.dis} if value.dis is not None else {})}
    if isinstance(value, Uri):
        return {"_kind": "uri", "val": value.val}
    if isinstance(value, Symbol):
        return {"_kind": "symbol", "val": value.val}
    if isinstance(value, datetime):
        if not isinstance(value.tzinfo, ZoneInfo):
            value = value.astimezone(UTC)
            name = "UTC"
        else:
            name = tz.haystack_name(str(value.tzinfo))
        text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
        return {"_kind": "dateTime", "val": text, "tz": name}
    if isinstance(value, date):
        return {"_kind": "date", "val": value.isoformat()}
    if isinstance(value, time):
        return {"_kind": "time", "val": value.isoformat()}
    if isinstance(value, Coord):
        return {"_kind": "coord", "lat": value.lat, "lng": value.lng}
    if isinstance(value, XStr):
        return {"_kind": "xstr", "type": value.type, "val": value.val}
    if isinstance(value, Grid):
        return grid_to_json(value)
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    raise ConfigError(f"no Haystack JSON encoding for {type(value).__name__}")


def grid_to_json(grid: Grid) -> dict[str, Any]:
    cols = grid.cols or (Col("empty"),)
    return {
        "_kind": "grid",
        "meta": {"ver": "3.0", **{k: to_json(v) for k, v in grid.meta.items() if k != "ver"}},
        "cols": [{"name": c.name, **({"meta": to_json(c.meta)} if c.meta else {})} for c in cols],
        "rows": [{k: to_json(v) for k, v in row.items() if v is not None} for row in grid.rows],
    }


def encode_grid(grid: Grid) -> str:
    return json.dumps(grid_to_json(grid), ensure_ascii=False, separators=(",", ":"))


def encode_his(his: His) -> str:
    """A one-point history as JSON, written row by row (same document as ``encode_grid(his.grid())``)."""
    head = encode_grid(Grid.of([], his.meta, cols=["ts", "val"]))
    assert head.endswith('"rows":[]}')
    name = json.dumps(tz.haystack_name(str(his.zone)))
    unit = "" if his.unit is None else f',"unit":{json.dumps(his.unit, ensure_ascii=False)}'
    rows = []
    for text, v in zip(his.local_texts(), his.values, strict=True):
        val = json.dumps(_number(v, his.unit), ensure_ascii=False, separators=(",", ":")) if not math.isfinite(v) else (
            f'{{"_kind":"number","val":{int(v) if v == int(v) and abs(v) < 1e15 else repr(v)}{unit}}}'
            if his.unit is not None else (str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v))
        )  # fmt: skip
        rows.append(f'{{"ts":{{"_kind":"dateTime","val":"{text}","tz":{name}}},"val":{val}}}')
    return head[: -len("[]}")] + "[" + ",".join(rows) + "]}"


class _Fault(Exception):
    pass


def _float(v: Any) -> float:
    if isinstance(v, str) and v in ("NaN", "INF", "-INF"):
        return {"NaN": math.nan, "INF": math.inf, "-INF": -math.inf}[v]
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise _Fault(f"number value {v!r} is not a number")
    try:
        return float(v)
    except ValueError as exc:
        raise _Fault(f"number value {v!r} is not a number") from exc


def from_json(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return Number(float(value))
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        raise _Fault(f"unexpected JSON value {value!r}")
    kind = value.get("_kind")
    if kind is None or kind == "dict":
        return {k: from_json(v) for k, v in value.items() if k != "_kind"}
    try:
        return _kind(kind, value)
    except (KeyError, ValueError, TypeError) as exc:
        raise _Fault(f"malformed {kind}: {json.dumps(value)[:200]}") from exc


def _kind(kind: str, value: dict[str, Any]) -> Any:
    if kind == "marker":
        return MARKER
    if kind == "na":
        return NA
    if kind == "remove":
        return REMOVE
    if kind == "number":
        return Number(_float(value["val"]), value.get("unit"))
    if kind == "ref":
        return Ref(str(value["val"]), value.get("dis"))
    if kind == "uri":
        return Uri(str(value["val"]))
    if kind == "symbol":
        return Symbol(str(value["val"]))
    if kind == "date":
        return date.fromisoformat(value["val"])
    if kind == "time":
        return time.fromisoformat(value["val"])
    if kind == "dateTime":
        parsed = datetime.fromisoformat(str(value["val"]).replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("dateTime without offset")
        name = value.get("tz")
        if name:
            try:
                return parsed.astimezone(tz.zone(name))
            except ConfigError as exc:
                raise _Fault(str(exc)) from exc
        return parsed
    if kind == "coord":
        return Coord(float(value["lat"]), float(value["lng"]))
    if kind == "xstr":
        return XStr(str(value["type"]), str(value["val"]))
    if kind == "grid":
        return _grid(value)
    raise _Fault(f"unknown _kind {kind!r}")


def _grid(value: dict[str, Any]) -> Grid:
    meta = from_json(value.get("meta") or {})
    cols_raw = value.get("cols") or []
    rows_raw = value.get("rows") or []
    if not isinstance(meta, dict) or not isinstance(cols_raw, list) or not isinstance(rows_raw, list):
        raise _Fault("a grid has an object meta and lists cols and rows")
    cols = []
    for c in cols_raw:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _Fault(f"column {c!r} has no name")
        cmeta = from_json(c.get("meta") or {})
        cols.append(Col(c["name"], cmeta if isinstance(cmeta, dict) else {}))
    rows = []
    for i, r in enumerate(rows_raw):
        if not isinstance(r, dict):
            raise _Fault(f"row {i} is not an object")
        rows.append({k: v for k, v in ((k, from_json(v)) for k, v in r.items()) if v is not None})
    return Grid(meta, tuple(cols), tuple(rows))


def decode_grid(text: str, source: str = "request") -> Grid:
    """A request grid; a bad body is an InputError at its place (JSON) or naming the fault."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(InputLocation(source, exc.lineno, exc.colno), f"invalid JSON: {exc.msg}") from exc
    try:
        if isinstance(raw, dict) and "_kind" not in raw and "rows" in raw:
            raw = {**raw, "_kind": "grid"}
        value = from_json(raw)
    except _Fault as exc:
        raise InputError(InputLocation(source, 1), str(exc)) from exc
    if isinstance(value, dict):  # a single dict is a one-row grid (as phable decodes responses)
        return Grid.of([value])
    if not isinstance(value, Grid):
        raise InputError(InputLocation(source, 1), "expected a grid")
    return value

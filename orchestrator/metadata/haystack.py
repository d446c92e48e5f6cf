"""Project Haystack JSON grids (``{"rows": [...]}``) to entities.

Two encodings occur in real exports and both are read:

* Haystack 3 JSON (a grid with ``meta.ver``): typed strings ``m:`` marker, ``r:id dis`` ref,
  ``n:42 kW`` number with unit, ``s:`` string, ``c:lat,lng`` coordinate, ``z:`` remove, ``-:`` NA.
* The older export style (no ``meta``, e.g. Ghausi Hall): markers ``"M"``, refs ``"@id \\"dis\\""``,
  numbers as JSON numbers, everything else a plain string.

Refs become the bare id; numbers with a unit become ``{"val": n, "unit": u}``. The whole file is
validated before anything is returned, so a bad file imports nothing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.exceptions import InputError, InputLocation
from orchestrator.metadata.jsonpos import PathStep, locate
from orchestrator.metadata.model import Entity, read_text

log = logging.getLogger(__name__)

_REF_CHARS = r"[A-Za-z0-9_:\-.~]+"
_LEGACY_REF = re.compile(rf'^@({_REF_CHARS})(?:\s+"(.*)")?$', re.DOTALL)
_V3_REF = re.compile(rf"^r:({_REF_CHARS})(?: (.*))?$", re.DOTALL)
_V3_NUMBER = re.compile(r"^n:(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|-?INF|NaN)(?: (.+))?$", re.DOTALL)
_V3_PREFIX = re.compile(r"^([a-zA-Z-]):")
_KIND_MARKERS = ("site", "space", "floor", "room", "zone", "equip", "point", "weatherStation", "device")
_POINT_MARKERS = ("sensor", "sp", "cmd", "his")  # exports often tag points by function only

_REMOVE = object()  # a Haystack 3 ``z:`` value: the tag is absent


class _Fault(Exception):
    """A bad value somewhere inside a row; carries the reason, the caller adds the place."""


def _number(text: str, unit: str | None) -> Any:
    if re.fullmatch(r"-?\d+", text):
        num: Any = int(text)
    elif text in ("INF", "-INF", "NaN"):
        num = text  # jsonb has no infinities or NaN: keep Haystack's spelling
    else:
        num = float(text)
    return {"val": num, "unit": unit} if unit else num


def _decode_v3(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_v3(v) for v in value]
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _decode_v3(v)) for k, v in value.items()) if v is not _REMOVE}
    if not isinstance(value, str):
        return value
    prefix = _V3_PREFIX.match(value)
    if not prefix:
        return value
    tag, body = prefix.group(1), value[2:]
    if tag == "m":
        return True
    if tag == "z":
        return _REMOVE
    if tag == "-":
        return None
    if tag == "r":
        ref = _V3_REF.match(value)
        if not ref:
            raise _Fault(f"malformed ref {value!r}")
        return ref.group(1)
    if tag == "n":
        num = _V3_NUMBER.match(value)
        if not num:
            raise _Fault(f"malformed number {value!r}")
        return _number(num.group(1), num.group(2))
    if tag == "c":
        try:
            lat, lng = (float(p) for p in body.split(","))
        except ValueError as exc:
            raise _Fault(f"malformed coordinate {value!r}") from exc
        return {"lat": lat, "lng": lng}
    return body  # s: t: d: h: u: x: b: — the text without its type prefix


def _decode_legacy(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_legacy(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode_legacy(v) for k, v in value.items()}
    if value == "M":
        return True
    if isinstance(value, str) and value.startswith("@"):
        ref = _LEGACY_REF.match(value)
        return ref.group(1) if ref else value
    return value


def _parse_id(raw: Any, v3: bool) -> tuple[str, str | None]:
    """The id and display name of a row's ``id`` tag, which must be a ref."""
    if not isinstance(raw, str):
        raise _Fault(f"id must be a ref string, not {type(raw).__name__}")
    ref = (_V3_REF if v3 else _LEGACY_REF).match(raw)
    if not ref:
        example = "r:abc-123 Name" if v3 else '@abc-123 "Name"'
        raise _Fault(f"id {raw!r} is not a ref (expected like {example!r})")
    return ref.group(1), ref.group(2)


def _kind(tags: dict[str, Any]) -> str:
    for marker in _KIND_MARKERS:
        if tags.get(marker) is True:
            return marker
    if any(tags.get(marker) is True for marker in _POINT_MARKERS):
        return "point"
    return "entity"


def _json_error(path: str, exc: json.JSONDecodeError) -> InputError:
    return InputError(InputLocation(path, exc.lineno, exc.colno), f"invalid JSON: {exc.msg}")


def parse_text(text: str, path: str) -> list[Entity]:
    """Entities of one Haystack JSON grid; raises InputError naming file, line and column."""
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from exc

    def fail(json_path: tuple[PathStep, ...], reason: str) -> InputError:
        return InputError(locate(path, text, json_path), reason)

    if not isinstance(grid, dict):
        raise fail((), f'a Haystack grid is a JSON object with a "rows" list, not a {type(grid).__name__}')
    rows = grid.get("rows")
    if not isinstance(rows, list):
        reason = 'grid has no "rows" list' if rows is None else f'"rows" must be a list, not {type(rows).__name__}'
        raise fail(("rows",), reason)
    if "cols" in grid and not isinstance(grid["cols"], list):
        raise fail(("cols",), '"cols" must be a list of column objects')
    meta = grid.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise fail(("meta",), '"meta" must be an object')
    v3 = isinstance(meta, dict) and "ver" in meta
    decode: Callable[[Any], Any] = _decode_v3 if v3 else _decode_legacy

    entities: list[Entity] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise fail(("rows", index), f"row {index} must be an object of tags, not {type(row).__name__}")
        if "id" not in row:
            raise fail(("rows", index), f"row {index} has no id tag")
        try:
            entity_id, dis = _parse_id(row["id"], v3)
        except _Fault as exc:
            raise fail(("rows", index, "id"), f"row {index}: {exc}") from exc
        if entity_id in seen:
            raise fail(("rows", index, "id"), f"row {index}: duplicate id {entity_id!r} (first in row {seen[entity_id]})")
        seen[entity_id] = index
        tags: dict[str, Any] = {}
        for key, raw in row.items():
            if key == "id":
                continue
            try:
                value = decode(raw)
            except _Fault as exc:
                raise fail(("rows", index, key), f"row {index}, tag {key!r}: {exc}") from exc
            if value is not _REMOVE:
                tags[key] = value
        if dis and "dis" not in tags:
            tags["dis"] = dis  # the ref's display name is the entity's own
        kind = _kind(tags)
        site_ref = entity_id if kind == "site" else tags.get("siteRef")
        entities.append(
            Entity(
                id=entity_id,
                kind=kind,
                metadata=tags,
                site_ref=site_ref if isinstance(site_ref, str) else None,
            )
        )
    log.info("parsed %d Haystack entities from %s (%s encoding)", len(entities), path, "JSON v3" if v3 else "export")
    return entities


def parse_file(path: Path) -> list[Entity]:
    return parse_text(read_text(path), str(path))

"""Zinc, Project Haystack's text format for grids (``text/zinc``): encode any grid, decode the
grids clients send (read, nav, hisRead, hisWrite requests) and the scalars of filters.

Decoding errors are :class:`~orchestrator.exceptions.InputError` with ``source:line:column``, so
a client sees exactly where its request is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from orchestrator.exceptions import ConfigError, InputError, InputLocation
from orchestrator.serve import tz
from orchestrator.serve.kinds import MARKER, NA, REMOVE, Col, Coord, Grid, His, Number, Ref, Symbol, Uri, XStr

MEDIA_TYPE = "text/zinc"
_ID_CHARS = re.compile(r"[A-Za-z0-9_:\-.~]")
_NAME = re.compile(r"[a-z][A-Za-z0-9_]*")
_UNIT_EXTRA = set("_$%/")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?")
_DATETIME = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(Z|[+-]\d{2}:\d{2})(?: ([A-Za-z][A-Za-z0-9_+\-/]*))?"
)
_NUMBER = re.compile(r"-?\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?")
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$", "`": "`"}

# ---------------------------------------------------------------- encoding


def _str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "$":
            out.append("\\$")
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def number_text(val: float) -> str:
    if math.isnan(val):
        return "NaN"
    if math.isinf(val):
        return "INF" if val > 0 else "-INF"
    if val == int(val) and abs(val) < 1e15:
        return str(int(val))
    return repr(float(val))


def datetime_text(value: datetime) -> str:
    """``2023-01-01T00:00:00Z UTC`` / ``2023-06-01T01:00:00+01:00 London``."""
    name = tz.haystack_name(str(value.tzinfo)) if isinstance(value.tzinfo, ZoneInfo) else "UTC"
    if not isinstance(value.tzinfo, ZoneInfo):
        value = value.astimezone(UTC)
    text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    if text.endswith("+00:00") and name == "UTC":
        text = text[:-6] + "Z"
    return f"{text} {name}"


def encode_value(value: Any) -> str:
    if value is None:
        return "N"
    if value is MARKER:
        return "M"
    if value is NA:
        return "NA"
    if value is REMOVE:
        return "R"
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int | float):
        return number_text(float(value))
    if isinstance(value, Number):
        return number_text(value.val) + (value.unit or "") if math.isfinite(value.val) else number_text(value.val)
    if isinstance(value, str):
        return _str(value)
    if isinstance(value, Ref):
        return f"@{value.val}" + (f" {_str(value.dis)}" if value.dis is not None else "")
    if isinstance(value, Uri):
        return "`" + value.val.replace("\\", "\\\\").replace("`", "\\`") + "`"
    if isinstance(value, Symbol):
        return f"^{value.val}"
    if isinstance(value, datetime):
        return datetime_text(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, time):
        return value.isoformat()
    if isinstance(value, Coord):
        return f"C({value.lat},{value.lng})"
    if isinstance(value, XStr):
        return f"{value.type}({_str(value.val)})"
    if isinstance(value, Grid):
        return "<<\n" + encode_grid(value) + ">>"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + _tags(value) + "}"
    raise ConfigError(f"no Zinc encoding for {type(value).__name__}")


def _tags(tags: Mapping[str, Any]) -> str:
    return " ".join(name if v is MARKER else f"{name}:{encode_value(v)}" for name, v in tags.items())


def encode_grid(grid: Grid) -> str:
    meta = {k: v for k, v in grid.meta.items() if k != "ver"}
    lines = ['ver:"3.0"' + (" " + _tags(meta) if meta else "")]
    cols = grid.cols or (Col("empty"),)
    lines.append(",".join(c.name + (" " + _tags(c.meta) if c.meta else "") for c in cols))
    for row in grid.rows:
        lines.append(",".join("" if row.get(c.name) is None else encode_value(row[c.name]) for c in cols))
    return "\n".join(lines) + "\n"


def encode_his(his: His) -> str:
    """A one-point history in Zinc, written row by row (same text as ``encode_grid(his.grid())``)."""
    head = encode_grid(Grid.of([], his.meta, cols=["ts", "val"]))
    name = tz.haystack_name(str(his.zone))
    unit = his.unit or ""
    utc = name == "UTC"
    lines = [head.rstrip("\n")]
    for text, v in zip(his.local_texts(), his.values, strict=True):
        if utc and text.endswith("+00:00"):
            text = text[:-6] + "Z"
        lines.append(f"{text} {name},{number_text(v)}{unit if math.isfinite(v) else ''}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.pos = 0
        self.source = source

    def fail(self, reason: str, at: int | None = None) -> InputError:
        at = self.pos if at is None else at
        line = self.text.count("\n", 0, at) + 1
        column = at - (self.text.rfind("\n", 0, at) + 1) + 1
        return InputError(InputLocation(self.source, line, column), reason)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def eof(self) -> bool:
        return self.pos >= len(self.text)

    def spaces(self) -> None:
        while self.peek() in (" ", "\t") and not self.eof():
            self.pos += 1

    def expect(self, ch: str) -> None:
        if self.peek(len(ch)) != ch:
            found = self.peek() or "end of input"
            raise self.fail(f"expected {ch!r}, found {found!r}")
        self.pos += len(ch)

    def match(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        m = pattern.match(self.text, self.pos)
        if m:
            self.pos = m.end()
        return m

    def name(self) -> str:
        m = self.match(_NAME)
        if not m:
            raise self.fail("expected a tag name (a lower-case letter, then letters, digits or _)")
        return m.group(0)

    def newline(self) -> None:
        if self.peek() == "\r":
            self.pos += 1
        self.expect("\n")

    # -- values

    def value(self) -> Any:
        start = self.pos
        ch = self.peek()
        if ch == '"':
            return self.string()
        if ch == "@":
            return self.ref()
        if ch == "`":
            return self.uri()
        if ch == "^":
            self.pos += 1
            return Symbol(self.match_ref_chars("symbol"))
        if ch == "[":
            return self.list_()
        if ch == "{":
            return self.dict_()
        if self.peek(2) == "<<":
            return self.nested_grid()
        if ch == "-" and self.peek(4) == "-INF":
            self.pos += 4
            return Number(-math.inf)
        if ch.isdigit() or ch == "-":
            return self.number_or_time()
        word = re.compile(r"[A-Za-z][A-Za-z0-9_]*").match(self.text, self.pos)
        if not word:
            raise self.fail(f"expected a value, found {ch or 'end of input'!r}")
        w = word.group(0)
        self.pos = word.end()
        simple = {"N": None, "M": MARKER, "R": REMOVE, "NA": NA, "T": True, "F": False}
        if w in simple:
            return simple[w]
        if w == "INF":
            return Number(math.inf)
        if w == "NaN":
            return Number(math.nan)
        if w == "C" and self.peek() == "(":
            self.pos += 1
            lat = self.plain_number()
            self.expect(",")
            lng = self.plain_number()
            self.expect(")")
            return Coord(lat, lng)
        if w[0].isupper() and self.peek() == "(":
            self.pos += 1
            val = self.string()
            self.expect(")")
            return XStr(w, val)
        raise self.fail(f"unknown value {w!r}", start)

    def match_ref_chars(self, what: str) -> str:
        start = self.pos
        while not self.eof() and _ID_CHARS.match(self.text[self.pos]):
            self.pos += 1
        if self.pos == start:
            raise self.fail(f"empty {what}")
        return self.text[start : self.pos]

    def ref(self) -> Ref:
        self.expect("@")
        val = self.match_ref_chars("ref")
        dis = None
        if self.peek(2) == ' "':
            self.pos += 1
            dis = self.string()
        return Ref(val, dis)

    def string(self) -> str:
        start = self.pos
        self.expect('"')
        out: list[str] = []
        while True:
            if self.eof() or self.peek() == "\n":
                raise self.fail("unterminated string", start)
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                esc = self.peek()
                if esc == "u":
                    hexa = self.text[self.pos + 1 : self.pos + 5]
                    if not re.fullmatch(r"[0-9a-fA-F]{4}", hexa):
                        raise self.fail("bad \\u escape")
                    out.append(chr(int(hexa, 16)))
                    self.pos += 5
                elif esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                    self.pos += 1
                else:
                    raise self.fail(f"bad escape \\{esc}")
            else:
                out.append(ch)

    def uri(self) -> Uri:
        start = self.pos
        self.expect("`")
        out: list[str] = []
        while True:
            if self.eof() or self.peek() == "\n":
                raise self.fail("unterminated uri", start)
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "`":
                return Uri("".join(out))
            if ch == "\\" and self.peek() in ("`", "\\"):
                ch = self.text[self.pos]
                self.pos += 1
            out.append(ch)

    def plain_number(self) -> float:
        m = self.match(_NUMBER)
        if not m:
            raise self.fail("expected a number")
        return float(m.group(0).replace("_", ""))

    def number_or_time(self) -> Any:
        start = self.pos
        m = _DATETIME.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            return _datetime(m, self, start)
        m = _DATE.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            try:
                return date.fromisoformat(m.group(0))
            except ValueError as exc:
                raise self.fail(f"bad date {m.group(0)!r}", start) from exc
        m = _TIME.match(self.text, self.pos)
        if m and m.group(0).count(":") >= 1 and self.text[self.pos + 2 : self.pos + 3] == ":":
            self.pos = m.end()
            try:
                return time.fromisoformat(m.group(0))
            except ValueError as exc:
                raise self.fail(f"bad time {m.group(0)!r}", start) from exc
        val = self.plain_number()
        unit_start = self.pos
        while not self.eof() and (
            self.text[self.pos].isalpha() or self.text[self.pos] in _UNIT_EXTRA or ord(self.text[self.pos]) > 127
        ):
            self.pos += 1
        unit = self.text[unit_start : self.pos] or None
        return Number(val, unit)

    def list_(self) -> list[Any]:
        self.expect("[")
        out = []
        self.spaces()
        while self.peek() != "]":
            out.append(self.value())
            self.spaces()
            if self.peek() == ",":
                self.pos += 1
                self.spaces()
            elif self.peek() != "]":
                raise self.fail("expected ',' or ']' in a list")
        self.pos += 1
        return out

    def dict_(self) -> dict[str, Any]:
        self.expect("{")
        tags = self.tags(end="}")
        self.expect("}")
        return tags

    def tags(self, end: str = "\n") -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.spaces()
        while not self.eof() and self.peek() not in (end, "\r", "\n", ","):
            name = self.name()
            if self.peek() == ":":
                self.pos += 1
                out[name] = self.value()
            else:
                out[name] = MARKER
            self.spaces()
            if end == "}" and self.peek() == ",":
                self.pos += 1
                self.spaces()
        return out

    def nested_grid(self) -> Grid:
        self.expect("<<")
        self.spaces()
        if self.peek() in ("\r", "\n"):
            self.newline()
        grid = self.grid(nested=True)
        self.expect(">>")
        return grid

    def grid(self, nested: bool = False) -> Grid:
        ver_at = self.pos
        if self.name() != "ver" or self.peek() != ":":
            raise self.fail('a Zinc grid starts with ver:"3.0"', ver_at)
        self.pos += 1
        ver = self.value()
        if ver not in ("3.0", "2.0"):
            raise self.fail(f"unsupported Zinc version {ver!r}", ver_at)
        meta = {"ver": ver, **self.tags()}
        self.newline()
        cols: list[Col] = []
        while True:
            self.spaces()
            name = self.name()
            self.spaces()
            cmeta = self.tags() if self.peek() not in (",", "\n", "\r") else {}
            cols.append(Col(name, cmeta))
            if self.peek() == ",":
                self.pos += 1
                continue
            break
        if not self.eof():
            self.newline()
        rows: list[dict[str, Any]] = []
        while not self.eof() and not (nested and self.peek(2) == ">>"):
            if self.peek() in ("\n", "\r"):
                self.newline()  # a blank line ends nothing; trailing blank lines are fine
                continue
            row: dict[str, Any] = {}
            for i, col in enumerate(cols):
                self.spaces()
                if self.peek() not in (",", "\n", "\r", "") and not (nested and self.peek(2) == ">>"):
                    v = self.value()
                    if v is not None:
                        row[col.name] = v
                self.spaces()
                if i < len(cols) - 1:
                    if self.peek() != ",":
                        raise self.fail(f"row has {i + 1} cells, the grid has {len(cols)} columns")
                    self.pos += 1
            rows.append(row)
            if self.peek() == ",":
                raise self.fail(f"row has more cells than the grid's {len(cols)} columns")
            if not self.eof() and not (nested and self.peek(2) == ">>"):
                self.newline()
        return Grid(meta, tuple(cols), tuple(rows))


def _datetime(m: re.Match[str], reader: _Reader, start: int) -> datetime:
    local, offset, name = m.group(1), m.group(2), m.group(3)
    try:
        parsed = datetime.fromisoformat(local + ("+00:00" if offset == "Z" else offset))
    except ValueError as exc:
        raise reader.fail(f"bad dateTime {m.group(0)!r}", start) from exc
    if name is None:
        return parsed if offset != "Z" else parsed.astimezone(ZoneInfo("UTC"))
    try:
        zone = tz.zone(name)
    except ConfigError as exc:
        raise reader.fail(str(exc), start) from exc
    value = parsed.astimezone(zone)
    if value.utcoffset() != parsed.utcoffset() and parsed.utcoffset() != timedelta(0):
        raise reader.fail(f"offset {offset} does not match time zone {name} at {local}", start)
    return value


def decode_grid(text: str, source: str = "request") -> Grid:
    reader = _Reader(text.lstrip("\ufeff"), source)
    while reader.peek() in ("\n", "\r") and not reader.eof():
        reader.pos += 1
    grid = reader.grid()
    reader.spaces()
    if not reader.eof():
        raise reader.fail("unexpected text after the grid")
    return grid


def decode_value(text: str, source: str = "value") -> Any:
    """One Zinc scalar (e.g. a hisRead range's dateTime, or a value in a filter)."""
    reader = _Reader(text, source)
    value = reader.value()
    if not reader.eof():
        raise reader.fail("unexpected text after the value")
    return value

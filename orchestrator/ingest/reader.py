"""Streaming readers of reading files. They yield validated rows with their line numbers and never
hold more than a chunk of lines in memory; a bad line is yielded as a :class:`Reject`.

Formats: CSV with the header ``building,meter,ts,kwh`` (any column order; plain or .gz), and JSON
lines ``{"building":..., "meter":..., "ts":..., "kwh":...}``. ``-`` reads standard input.

A row is a tuple ``(line, building, meter, csv)``: building and meter (bytes, for routing) and the row as
one CSV line in ``building,meter,ts,kwh`` order (bytes, ready for ``COPY ... (FORMAT csv)``). The
common case (an unquoted CSV line in header order) is checked on bytes without decoding fields,
with the timestamps already seen cached; anything unusual takes the careful path, which also
produces the precise error.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from orchestrator.exceptions import InputError, InputLocation
from orchestrator.ingest.source import Source
from orchestrator.ingest.validate import MAX_TEXT, FieldError, check_text, parse_kwh, parse_ts

COLUMNS = ("building", "meter", "ts", "kwh")
TS_CACHE_LIMIT = 200_000

ParsedRow = tuple[int, bytes, bytes, bytes]  # line, building, meter, csv
TICK_ROW: ParsedRow = (0, b"", b"", b"")  # follow mode: nothing arrived for a while


@dataclass(frozen=True, slots=True)
class Reject:
    line: int
    column: int
    reason: str
    raw: bytes


def _decode(source: str, number: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        col = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        raise InputError(InputLocation(source, number, col), f"invalid UTF-8 byte 0x{raw[exc.start]:02x}") from exc
    return text.rstrip("\r\n")


def _column_of(fields: list[str], index: int) -> int:
    """1-based character column where field ``index`` starts (unquoted layout)."""
    return sum(len(f) + 1 for f in fields[:index]) + 1


def _csv_bytes(building: str, meter: str, ts: str, kwh: str) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow((building, meter, ts, kwh))
    return buf.getvalue().encode()


class CsvRows:
    """Validated rows of a CSV source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.order: tuple[int, int, int, int] = (0, 1, 2, 3)
        self._good_ts: set[bytes] = set()

    def _header(self, lines: Iterator[tuple[int, bytes]]) -> None:
        first = next((item for item in lines if item[0]), None)
        if first is None:
            raise InputError(InputLocation(self.source.name, 1), "empty input: missing header building,meter,ts,kwh")
        text = _decode(self.source.name, 1, first[1]).lstrip("\ufeff")
        names = [n.strip().lower() for n in text.split(",")]
        if sorted(names) != sorted(COLUMNS) or len(names) != len(COLUMNS):
            raise InputError(
                InputLocation(self.source.name, 1, 1), f"wrong header {text!r}: expected the columns building,meter,ts,kwh"
            )
        self.order = (names.index("building"), names.index("meter"), names.index("ts"), names.index("kwh"))

    def __iter__(self) -> Iterator[ParsedRow | Reject]:
        lines = self.source.lines()
        self._header(lines)
        if self.order == (0, 1, 2, 3):
            yield from self._fast(lines)
        else:
            for number, raw in lines:
                yield self._careful(number, raw) if number else TICK_ROW

    def _fast(self, lines: Iterable[tuple[int, bytes]]) -> Iterator[ParsedRow | Reject]:
        good_ts = self._good_ts
        isfinite = math.isfinite
        for number, raw in lines:
            line = raw.rstrip(b"\r\n")
            parts = line.split(b",")
            if len(parts) == 4 and b'"' not in line and b"\x00" not in line:
                b, m, ts, k = parts
                if b and m and len(b) <= MAX_TEXT and len(m) <= MAX_TEXT and ts in good_ts and b"_" not in k:
                    try:
                        line.decode("utf-8")
                        ok = isfinite(float(k))
                    except ValueError:
                        ok = False
                    if ok:
                        yield number, b, m, line
                        continue
            yield self._careful(number, raw) if number else TICK_ROW

    def _careful(self, number: int, raw: bytes) -> ParsedRow | Reject:
        name = self.source.name
        try:
            text = _decode(name, number, raw)
        except InputError as exc:
            return Reject(number, exc.location.column, exc.reason, raw)
        quoted = '"' in text
        fields = next(csv.reader([text])) if quoted else text.split(",")
        if len(fields) != 4:
            what = "missing" if len(fields) < 4 else "extra"
            return Reject(number, 0, f"{what} fields: expected 4 (building,meter,ts,kwh), got {len(fields)}", raw)
        o = self.order
        try:
            building = check_text(fields[o[0]], "building", o[0])
            meter = check_text(fields[o[1]], "meter", o[1])
            parse_ts(fields[o[2]], o[2])
            parse_kwh(fields[o[3]], o[3])
        except FieldError as exc:
            return Reject(number, 0 if quoted else _column_of(fields, exc.field), exc.reason, raw)
        ts = fields[o[2]].encode()
        if len(self._good_ts) >= TS_CACHE_LIMIT:
            self._good_ts.clear()
        self._good_ts.add(ts)
        if o == (0, 1, 2, 3) and not quoted:
            return number, building.encode(), meter.encode(), text.encode()
        return number, building.encode(), meter.encode(), _csv_bytes(building, meter, fields[o[2]], fields[o[3]])


class JsonRows:
    """Validated rows of a JSON-lines source (one object per line)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __iter__(self) -> Iterator[ParsedRow | Reject]:
        name = self.source.name
        for number, raw in self.source.lines():
            if not number:
                yield TICK_ROW
                continue
            try:
                text = _decode(name, number, raw)
            except InputError as exc:
                yield Reject(number, exc.location.column, exc.reason, raw)
                continue
            if not text.strip():
                yield Reject(number, 0, "empty line: expected a JSON object", raw)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Reject(number, exc.colno, f"invalid JSON: {exc.msg}", raw)
                continue
            yield _json_row(obj, number, raw)


def _json_row(obj: object, number: int, raw: bytes) -> ParsedRow | Reject:
    if not isinstance(obj, dict):
        return Reject(number, 1, "expected a JSON object with building, meter, ts, kwh", raw)
    missing = [c for c in COLUMNS if c not in obj]
    extra = sorted(set(obj) - set(COLUMNS))
    if missing:
        return Reject(number, 0, f"missing fields: {', '.join(missing)}", raw)
    if extra:
        return Reject(number, 0, f"extra fields: {', '.join(extra)}", raw)
    try:
        b, m, t, k = obj["building"], obj["meter"], obj["ts"], obj["kwh"]
        if not isinstance(b, str) or not isinstance(m, str) or not isinstance(t, str):
            raise FieldError(0, "building, meter and ts must be strings")
        if isinstance(k, bool) or not isinstance(k, int | float | str):
            raise FieldError(3, f"kwh {k!r} is not a number")
        building = check_text(b, "building", 0)
        meter = check_text(m, "meter", 1)
        parse_ts(t, 2)
        kwh = parse_kwh(k if isinstance(k, str) else repr(float(k)), 3)
    except FieldError as exc:
        return Reject(number, 0, exc.reason, raw)
    return number, building.encode(), meter.encode(), _csv_bytes(building, meter, t, repr(kwh))


def open_rows(path: str, fmt: str | None = None, follow: bool = False) -> tuple[Source, CsvRows | JsonRows]:
    """The source and its row iterator; the format comes from ``fmt`` or the file name."""
    source = Source(path, follow=follow)
    if fmt is None:
        lowered = path.lower().removesuffix(".gz")
        fmt = "jsonl" if lowered.endswith((".jsonl", ".ndjson", ".json")) else "csv"
    if fmt == "csv":
        return source, CsvRows(source)
    if fmt == "jsonl":
        return source, JsonRows(source)
    source.close()
    raise InputError(InputLocation(path, 0), f"unknown format {fmt!r}: use csv or jsonl")

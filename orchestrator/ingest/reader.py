"""Streaming readers of reading files. They yield validated rows with their line numbers and never
hold more than one line in memory; a bad line raises (or, with rejects, is yielded as a Reject).

Formats: CSV with the header ``building,meter,ts,kwh`` (any column order; plain or .gz), and JSON
lines ``{"building":..., "meter":..., "ts":..., "kwh":...}``. ``-`` reads standard input.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from orchestrator.exceptions import InputError, InputLocation
from orchestrator.ingest.validate import FieldError, check_text, parse_kwh, parse_ts

COLUMNS = ("building", "meter", "ts", "kwh")


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    building: str
    meter: str
    ts: datetime
    kwh: float
    csv_text: str  # the row as one CSV line in COLUMNS order, ready for COPY ... (FORMAT csv)


@dataclass(frozen=True, slots=True)
class Reject:
    line: int
    column: int
    reason: str
    raw: bytes


class Source:
    """An input stream: a path (plain or gzip) or standard input, with a readable name and position."""

    def __init__(self, path: str) -> None:
        self.name = "<stdin>" if path == "-" else path
        self._raw: BinaryIO
        if path == "-":
            self._raw = sys.stdin.buffer
            self.size: int | None = None
        else:
            try:
                self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise InputError(InputLocation(path, 0), f"cannot open: {exc.strerror}") from exc
            self.size = Path(path).stat().st_size
        magic = self._raw.peek(2)[:2] if hasattr(self._raw, "peek") else b""
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self._raw) if magic == b"\x1f\x8b" else self._raw  # type: ignore[assignment]

    def position(self) -> int:
        """Bytes consumed of the underlying (possibly compressed) file, for progress."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            yield from enumerate(self.stream, 1)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(InputLocation(self.name, 0), f"cannot read: {exc}") from exc

    def close(self) -> None:
        if self._raw is not sys.stdin.buffer:
            self._raw.close()


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


class CsvRows:
    """Validated rows of a CSV source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.order: tuple[int, int, int, int] = (0, 1, 2, 3)

    def _header(self, lines: Iterator[tuple[int, bytes]]) -> None:
        first = next(lines, None)
        if first is None:
            raise InputError(InputLocation(self.source.name, 1), "empty input: missing header building,meter,ts,kwh")
        text = _decode(self.source.name, 1, first[1]).lstrip("\ufeff")
        names = [n.strip().lower() for n in text.split(",")]
        if sorted(names) != sorted(COLUMNS) or len(names) != len(COLUMNS):
            raise InputError(
                InputLocation(self.source.name, 1, 1), f"wrong header {text!r}: expected the columns building,meter,ts,kwh"
            )
        self.order = tuple(names.index(c) for c in COLUMNS)  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Row | Reject]:
        lines = self.source.lines()
        self._header(lines)
        name = self.source.name
        order = self.order
        in_order = order == (0, 1, 2, 3)
        for number, raw in lines:
            try:
                text = _decode(name, number, raw)
            except InputError as exc:
                yield Reject(number, exc.location.column, exc.reason, raw)
                continue
            quoted = '"' in text
            fields = next(csv.reader([text])) if quoted else text.split(",")
            if len(fields) != 4:
                what = "missing" if len(fields) < 4 else "extra"
                yield Reject(number, 0, f"{what} fields: expected 4 (building,meter,ts,kwh), got {len(fields)}", raw)
                continue
            try:
                building = check_text(fields[order[0]], "building", order[0])
                meter = check_text(fields[order[1]], "meter", order[1])
                ts = parse_ts(fields[order[2]], order[2])
                kwh = parse_kwh(fields[order[3]], order[3])
            except FieldError as exc:
                col = 0 if quoted else _column_of(fields, exc.field)
                yield Reject(number, col, exc.reason, raw)
                continue
            if in_order and not quoted:
                csv_text = text
            else:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="").writerow((building, meter, fields[order[2]], fields[order[3]]))
                csv_text = buf.getvalue()
            yield Row(number, building, meter, ts, kwh, csv_text)


class JsonRows:
    """Validated rows of a JSON-lines source (one object per line)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Row | Reject]:
        name = self.source.name
        for number, raw in self.source.lines():
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


def _json_row(obj: object, number: int, raw: bytes) -> Row | Reject:
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
        ts = parse_ts(t, 2)
        kwh = parse_kwh(k if isinstance(k, str) else repr(float(k)), 3)
    except FieldError as exc:
        return Reject(number, 0, exc.reason, raw)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow((building, meter, t, repr(kwh)))
    return Row(number, building, meter, ts, kwh, buf.getvalue())


def open_rows(path: str, fmt: str | None = None) -> tuple[Source, CsvRows | JsonRows]:
    """The source and its row iterator; the format comes from ``fmt`` or the file name."""
    source = Source(path)
    if fmt is None:
        lowered = path.lower().removesuffix(".gz")
        fmt = "jsonl" if lowered.endswith((".jsonl", ".ndjson", ".json")) else "csv"
    if fmt == "csv":
        return source, CsvRows(source)
    if fmt == "jsonl":
        return source, JsonRows(source)
    source.close()
    raise InputError(InputLocation(path, 0), f"unknown format {fmt!r}: use csv or jsonl")
